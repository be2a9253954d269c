# Two commands on a fresh clone: `make demo` (the main job on the embedded data) and
# `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast install clean mlflow-ui

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/potion demo --out runs/demo --overwrite

# Tests pin Ray's auth mode and MLflow's store themselves (tests/conftest.py).
test: $(STAMP)
	$(PY) -m pytest -q

# No Ray cluster, no end-to-end pipeline runs (see the markers in pyproject.toml).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not ray"

# The demo's MLflow store; open the link `make demo` printed (it ends in ?workflowType=machine_learning).
MLFLOW_PORT ?= 5000
mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/runs/demo/mlflow.db --port $(MLFLOW_PORT)

clean:
	rm -rf runs .pytest_cache
