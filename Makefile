# Two commands do everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests run as if on 8 devices, so the sharded code paths are exercised on CPU.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

.PHONY: install test test-fast test-multiprocess ci demo notebook clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch==2.13.0 (test extra) resolves to the CPU wheel on disk; use pip, not uv.
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Two workers, a test file each at a time (module fixtures compile once): compiles are single-threaded, so two
# overlap on 2 cores. Everything, slow tests included: about 15 minutes on a 2-core VM with an empty compile cache,
# 12 with a warm one (tests/README.md has the durations).
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile -m "not multiprocess" tests

# The fast tier: all but the tests marked slow (tests/README.md); about 1.5 minutes on 2 cores, warm compile cache.
test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not multiprocess" tests

# 2 processes x 4 CPU devices (jax.distributed on localhost) against 1 process x 8: tokens, DiC predictions,
# a SIGTERM that reaches one process. Two processes already fill two cores, so one pytest worker.
test-multiprocess: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -m multiprocess tests

# What CI runs (.ci/run): the tests, the multi-process tests, the notebook.
ci: test test-multiprocess notebook

demo: $(STAMP)
	$(PY) -m mcti_jax.cli demo

# colab/mcti_jax.ipynb executed top to bottom on its cpu setting (the tiny model), as a person would.
notebook: $(STAMP)
	$(TEST_ENV) $(PY) colab/execute.py

clean:
	rm -rf $(VENV) runs .pytest_cache
