# Federation / recalibration job image: Ray's base image (Ray version = the one the package is tested with).
# The `cluster` extra pins ray[default] (job server, dashboard, `ray job submit`) to that same version.
# Used for the RayJob head and workers, and for the scheduled recalibration's CronJob pod (bash + kubectl).
# Tag it with the package version (pyproject), never a floating tag. Build from the repository root:
#   docker build -f deploy/docker/federation-job.Dockerfile -t ifedicl-federation:0.1.0 .
FROM rayproject/ray:2.60.0-py311-cpu
WORKDIR /home/ray/ifedicl
# Every folder pyproject's [tool.setuptools] packages (the wheel is built from them): tests/test_deploy.py checks.
COPY --chown=ray:users pyproject.toml README.md requirements-cpu.lock ./
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
# Every package at the version CI tested: the CPU lock as constraints (make lock; deploy/uv_install.py).
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu ".[cluster]" --constraint requirements-cpu.lock
ENV HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
# kubectl for the CronJob's recalibrate-rayjob.sh (deploy/k8s/recalibrate-cronjob.yaml), pinned, and checked
# against the SHA-256 the Kubernetes release publishes beside it. TARGETARCH comes from BuildKit (amd64/arm64).
ARG KUBECTL_VERSION=v1.33.0
ARG TARGETARCH
ADD --chmod=755 https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl /usr/local/bin/kubectl
ADD --chmod=644 https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl.sha256 /tmp/kubectl.sha256
RUN echo "$(cat /tmp/kubectl.sha256)  /usr/local/bin/kubectl" | sha256sum --check --strict && kubectl version --client
