# The two commands the README promises: `make demo` and `make test`.
# torch is installed first with an upper bound so pip takes the local CPU wheel instead of
# several GB of CUDA wheels that a bare `torch>=2.6` would resolve to.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: demo demo-encoders test test-gpu bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q 'torch>=2.6,<2.14'
	$(PIP) install -q -e '.[test,plot,sentences]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) tools/demo.py

demo-encoders: $(STAMP)
	$(PY) tools/demo_encoders.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo-out
