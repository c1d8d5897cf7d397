# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install demo test test-long bench clean
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/skm demo

test: $(STAMP)
	$(BIN)/pytest -q

test-long: $(STAMP)
	$(BIN)/pytest -q -m long

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .skm build *.egg-info
