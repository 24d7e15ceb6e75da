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

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m mcti_jax.cli demo

clean:
	rm -rf $(VENV) runs .pytest_cache
