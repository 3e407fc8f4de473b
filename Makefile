# msattn -- `make demo` runs the main job, `make test` the test suite. Both create or reuse .venv/
# at the project root and install what they need with pip: torch (TORCH, default torch==2.13.0;
# any torch 2.11-2.15 already in .venv is kept), the HF stack, the test tools, and msattn itself,
# built against that torch with `pip install --no-build-isolation`.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
DEPS   := setuptools wheel ninja "transformers>=5.17" "peft>=0.17" "accelerate>=1.0" \
          pytest hypothesis expecttest numpy "tqdm>=4.66" "matplotlib>=3.8"
SOURCES := $(shell find csrc msattn -name '*.c' -o -name '*.h' -o -name '*.cpp' -o -name '*.cu') \
           setup.py pyproject.toml
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test test-slow demo bench clean

install: $(VENV)/.msattn-built

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(PY) Makefile
	@$(PY) -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(not (2, 11) <= v < (2, 16))' 2>/dev/null \
		&& echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PIP) install -q "$(TORCH)"
	$(PIP) install -q $(DEPS)
	touch $@

$(VENV)/.msattn-built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the long-context runs kept out of the default suite
test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# the main job: train a tiny Llama at 256 tokens (MS and dense), evaluate passkey retrieval to 64x
demo: install
	$(PY) -m msattn.demo $(DEMO_ARGS)

bench: install
	$(PY) benchmarks/bench_attention.py --lengths 4096,8192,16384,32768 --json bench_out/attention.json

clean:
	rm -rf build $(VENV) msattn/*.so *.egg-info
