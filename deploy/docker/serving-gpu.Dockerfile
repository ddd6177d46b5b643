# Serving image, GPU: the official vLLM OpenAI image (same vLLM version as pyproject's `gpu` extra).
# Build from the repository root:  docker build -f deploy/docker/serving-gpu.Dockerfile -t ifedicl-serving:gpu .
FROM vllm/vllm-openai:v0.32.0
WORKDIR /opt/ifedicl
COPY pyproject.toml README.md ./
COPY federation_job ./federation_job
COPY model_patches ./model_patches
COPY serving ./serving
COPY storage ./storage
# vLLM is already in the base image: install the package without re-resolving torch/vLLM.
RUN pip install --no-cache-dir --no-deps . && pip install --no-cache-dir lancedb pyarrow typer prometheus-client filelock
ENV HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
EXPOSE 8000 9464
ENTRYPOINT ["ifedicl", "serve"]
