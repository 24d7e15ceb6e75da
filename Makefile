# Two commands do everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Tests run as if on 8 devices, so the sharded code paths are exercised on CPU.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch==2.13.0 (test extra) resolves to the CPU wheel on disk; use pip, not uv.
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# Two workers, a test file each at a time (module fixtures compile once): compiles are single-threaded, so two
# overlap on 2 cores (28.5 -> 21.5 minutes with an empty compile cache, this machine, 2026-11-30).
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --dist loadfile tests

demo: $(STAMP)
	$(PY) -m mcti_jax.cli demo

clean:
	rm -rf $(VENV) runs .pytest_cache
