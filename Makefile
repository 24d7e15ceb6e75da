# Two commands do everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Two install stamps, each redone when pyproject.toml changes: the runtime (`make install`, `make demo`: the package
# and its runtime dependencies, no torch) and on top of it the test extra (`make test` and the targets below it).
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# Tests run as if on 8 devices, so the sharded code paths are exercised on CPU. LLVM at -O1 instead of -O3: the
# tests' many small programs compile about a quarter faster and run as fast (the golden fixture holds bit for bit).
TEST_ENV := XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1" JAX_PLATFORMS=cpu

.PHONY: install test test-fast test-multiprocess ci demo notebook wheel-smoke clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $(STAMP)

# The test extra brings torch==2.13.0 (the reference the JAX models are checked against). On the CI machine that
# spec resolves to the CPU wheel on disk (pip's find-links); any other torch spec, or a machine without that
# wheel, pulls the CUDA build from PyPI (gigabytes). uv does not see that wheel, so this is pip. Elsewhere install
# the CPU wheel first: $(PY) -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

install: $(STAMP)

# Two workers, a test file each at a time (module fixtures compile once): compiles are single-threaded, so two
# overlap on 2 cores. Everything, slow tests included: about 13 minutes on a 2-core VM with an empty compile cache
# (tests/README.md has the durations).
test: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile -m "not multiprocess" tests

# The fast tier: all but the tests marked slow (tests/README.md); about 1.5 minutes on 2 cores, warm compile cache.
test-fast: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not multiprocess" tests

# 2 processes x 4 CPU devices (jax.distributed on localhost) against 1 process x 8: tokens, DiC predictions,
# a SIGTERM that reaches one process. Two processes already fill two cores, so one pytest worker.
test-multiprocess: $(TEST_STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m multiprocess tests

# What CI runs (.ci/run): the tests, the multi-process tests, the notebook.
ci: test test-multiprocess notebook

demo: $(STAMP)
	$(PY) -m mcti_jax.cli demo

# colab/mcti_jax.ipynb executed top to bottom on its cpu setting (the tiny model), as a person would.
notebook: $(TEST_STAMP)
	$(TEST_ENV) $(PY) colab/execute.py

# The wheel as a user gets it: built from this checkout, installed with its runtime dependencies only into a fresh
# venv outside the repository, `mcti --help` and a quick demo run from outside it (.ci/wheel_smoke.sh; .ci/run).
wheel-smoke:
	.ci/wheel_smoke.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
