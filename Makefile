# Two entry points, both self-contained on a fresh CPU machine:
#   make demo   set up .venv, then run the on- vs off-policy comparison on the embedded default
#   make test   set up .venv, then lint and run the test suite (CI runs exactly this)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv
venv: $(VENV)/.installed

# torch==2.13.0 first, so that nothing below pulls a multi-GB CUDA build onto a CPU box.
# OpenRLHF is installed as source only (--no-deps): its vllm/flash-attn pins have no CPU wheels.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps openrlhf==0.11.2
	touch $@

demo: venv
	$(PY) -m openrlhf_entropic.cli.compare --output-dir runs/quickstart

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
