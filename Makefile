# Everything runs in a project-local virtual environment. torch is pinned through constraints.txt
# so no step can pull a CUDA build; DeepSpeed is installed only for tests (it writes fixtures and
# provides the reference values).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
# A second environment as a user gets it from a plain `pip install .`: no extras, no DeepSpeed,
# no numpy. tests/cli/test_plain_install.py runs the CLI there on every fixture against the dev env.
PLAIN ?= .venv-plain
PLAIN_PIP := $(PLAIN)/bin/pip install --disable-pip-version-check -q -c constraints.txt
SOURCES := $(shell find dsckpt -name '*.py' -o -name '*.json')
DEEPSPEED_VERSION := 0.19.8
SAMPLE := tests/fixtures/zero/z2-bf16-dp2/ckpt
DEMO_OUT := demo-out

.PHONY: demo test fixtures bench lint clean

$(BIN)/dsckpt: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

# Not editable: the copy installed is what a wheel holds (remade when a source changes).
$(PLAIN)/.installed: pyproject.toml constraints.txt $(SOURCES)
	test -x $(PLAIN)/bin/python || $(PYTHON) -m venv $(PLAIN)
	$(PLAIN_PIP) torch==2.13.0
	$(PLAIN_PIP) .  # a local project is rebuilt and reinstalled on every run
	touch $@

$(VENV)/.deepspeed: $(BIN)/dsckpt
	$(PIP) --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(PIP) transformers accelerate peft  # test-only, pinned in constraints.txt
	touch $@

## demo: set up, then inspect and consolidate the bundled sample checkpoint
demo: $(BIN)/dsckpt
	$(BIN)/dsckpt inspect $(SAMPLE)
	$(BIN)/dsckpt to-fp32 $(SAMPLE) $(DEMO_OUT)/model.safetensors --force
	$(BIN)/python -c "from safetensors.torch import load_file; sd = load_file('$(DEMO_OUT)/model.safetensors'); print(len(sd), 'tensors loaded back without DeepSpeed')"

## test: set up (with test-only DeepSpeed) and run the whole suite
test: $(VENV)/.deepspeed $(PLAIN)/.installed
	DSCKPT_PLAIN_VENV=$(PLAIN) $(BIN)/python -m pytest -q

## fixtures: regenerate the DeepSpeed-written checkpoints under tests/fixtures
fixtures: $(VENV)/.deepspeed
	$(BIN)/python tests/fixtures/generate.py
	$(BIN)/python tests/fixtures/generate_pipe.py
	$(BIN)/python tests/fixtures/generate_hf.py
	$(BIN)/python tests/fixtures/generate_moe.py

## bench: the benchmark against DeepSpeed's own tools (large; minutes)
bench: $(VENV)/.deepspeed
	$(PIP) huggingface_hub  # DeepSpeed's zero_to_fp32.py CLI imports it
	$(BIN)/python bench/bench_to_fp32.py

lint: $(BIN)/dsckpt
	$(PIP) ruff mypy
	$(BIN)/ruff check dsckpt tests bench
	$(BIN)/ruff format --check dsckpt tests bench
	$(BIN)/mypy dsckpt
	$(BIN)/lint-imports  # the layer contract of pyproject.toml (docs/architecture.md)

clean:
	rm -rf $(VENV) $(PLAIN) $(DEMO_OUT) .pytest_cache
