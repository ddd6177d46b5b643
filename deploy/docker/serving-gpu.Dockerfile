# Serving image, GPU: the official vLLM OpenAI image (same vLLM version as pyproject's `gpu` extra).
# Build from the repository root:  docker build -f deploy/docker/serving-gpu.Dockerfile -t ifedicl-serving:0.1.0-gpu .
# (tag: the package version in pyproject, never a floating tag)
FROM vllm/vllm-openai:v0.32.0
WORKDIR /opt/ifedicl
# Every folder pyproject's [tool.setuptools] packages (the wheel is built from them): tests/test_deploy.py checks.
COPY pyproject.toml README.md requirements-gpu.lock ./
COPY kernel ./kernel
COPY model_patches ./model_patches
COPY storage ./storage
COPY serving ./serving
COPY federation_job ./federation_job
COPY devkit ./devkit
COPY evaluation ./evaluation
COPY cli ./cli
# Dependencies come from pyproject only (core + `gpu`): a `--no-deps` hand list here once lacked
# `cryptography`, which `ifedicl recalibration-exporter` imports. vLLM and its
# CUDA torch are already in the base image at the versions the `gpu` extra pins, so pip keeps them and adds
# only what is missing.
# Every package at the version the GPU lock names (make lock; deploy/uv_install.py), as constraints.
RUN pip install --no-cache-dir ".[gpu]" --constraint requirements-gpu.lock
ENV HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
EXPOSE 8000 9464
ENTRYPOINT ["ifedicl", "serve"]
