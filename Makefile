# The README's two set-up commands: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

# `make demo`: the runtime only (no test extras), with pip's progress shown: a first run downloads a lot.
$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e .
	touch $(RUNTIME_STAMP)

# `make test` and the rest: the runtime and the test extras (the runtime stamp is then current too).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP) $(RUNTIME_STAMP)

# Tools whose pins clash with the project's (sslyze wants cryptography<47) get their own venv.
TOOLS := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed

$(TOOLS_STAMP):
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --upgrade pip
	$(TOOLS)/bin/pip install -q 'sslyze>=6.0'
	touch $(TOOLS_STAMP)

.PHONY: install demo test test-long test-postgres bench bench-smoke screenshots clean
install: $(STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/skm demo

# Every target ends with the secret-hygiene sweep (tests/reliability/test_secret_hygiene.py, ordered
# last by its conftest): it greps what the run before it left behind, in the same pytest session.
test: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/pytest -q

test-long: $(STAMP) $(TOOLS_STAMP)
	$(BIN)/pytest -q -m 'long or sweep'

# The API, key and storage tests (and the sealed access rows) again with every key server on a throwaway PostgreSQL.
test-postgres: $(STAMP)
	SKM_TEST_STORAGE=postgresql $(BIN)/pytest -q tests/api tests/keys tests/storage tests/access/test_seal.py tests/access/test_seal_stores.py \
		tests/access/test_seal_approvals.py tests/access/test_seal_lineage.py \
		tests/replicas/test_harness_backend.py tests/reliability/test_secret_hygiene.py

bench: $(STAMP)
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench --postgres
	$(BIN)/python -m bench --cores 2 --postgres --systems skm,openbao --only secret-read --only encrypt --only sign-ec --scale 0

# A few seconds per workload, our server + sidecar + floor only: checks the harness, not the numbers.
bench-smoke: $(STAMP)
	$(BIN)/python -m bench --systems skm,sidecar,floor --duration 2 --runs 1 --warmup 0 --scale 2000 --backup-keys 2000

# The console's pages in Chromium (Debian's package), full-page PNGs written to docs/console/.
screenshots: $(STAMP)
	SKM_SCREENSHOTS=docs/console $(BIN)/pytest -q tests/console/test_home.py

clean:
	rm -rf $(VENV) $(TOOLS) .skm build *.egg-info
