# Federation / recalibration job image: Ray's base image (Ray version = the one the package is tested with).
# The `cluster` extra pins ray[default] (job server, dashboard, `ray job submit`) to that same version.
# Used for the RayJob head and workers. Build from the repository root:
#   docker build -f deploy/docker/federation-job.Dockerfile -t ifedicl-federation:latest .
FROM rayproject/ray:2.60.0-py311-cpu
WORKDIR /home/ray/ifedicl
# Every folder pyproject's [tool.setuptools] packages (the wheel is built from them): tests/test_deploy.py checks.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users kernel ./kernel
COPY --chown=ray:users model_patches ./model_patches
COPY --chown=ray:users storage ./storage
COPY --chown=ray:users serving ./serving
COPY --chown=ray:users federation_job ./federation_job
COPY --chown=ray:users devkit ./devkit
COPY --chown=ray:users evaluation ./evaluation
COPY --chown=ray:users cli ./cli
# Dependencies come from pyproject only (core + `cluster`), never a hand list that can drift from it.
# The CPU torch index serves torch==<pinned>+cpu, which keeps the image small (PyPI's Linux torch is the CUDA
# build); for GPU clients use rayproject/ray:2.60.0-py311-gpu and drop the extra index.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[cluster]"
ENV HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
