# The two user-facing commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
TORCH_INDEX := https://download.pytorch.org/whl
# Cache for DeepSpeed's JIT-built CPU extensions, so they compile once per machine.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install test demo clean

install: $(STAMP)

# Re-runs only when a dependency file changes: a second `make install` does nothing.
# torch: on a machine with an NVIDIA driver, PyTorch's CUDA build of the pinned version first
# (scripts/torch_variant.sh picks it from the driver and says why; `make install TORCH_CUDA=cu126`
# or TORCH_CUDA=cpu chooses); elsewhere the CPU wheel, with everything else. DeepSpeed is built
# without its ops (DS_BUILD_OPS=0), on GPUs too: an op a run uses compiles on first use into
# TORCH_EXTENSIONS_DIR (docs/gpus.md builds one ahead of time).
$(STAMP): requirements.txt requirements-dev.txt requirements-deepspeed.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	variant=$$(sh scripts/torch_variant.sh) && if [ "$$variant" != cpu ]; then \
	    $(PIP) install -q -c constraints.txt torch --index-url $(TORCH_INDEX)/$$variant; fi
	$(PIP) install -q -c constraints.txt -r requirements.txt -r requirements-dev.txt
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt --no-build-isolation -r requirements-deepspeed.txt
	$(PIP) install -q -c constraints.txt --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The whole curriculum (baselines, stage 0 -> 1 -> 2 -> transfer) on the tiny preset, 2 CPU
# processes per stage; corpora are regenerated (seeded, ~5 s), stages resume if interrupted.
demo: install
	$(PY) -m pali3_train.data_pipeline.demo_corpus --demo
	$(PY) launcher/curriculum.py configs/tiny/curriculum.yaml

clean:
	rm -rf $(VENV) .cache .pytest_cache
