# mmjobs — the two commands are `make demo` and `make test`; each sets everything up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Installing is keyed on the dependency files: edit them and the next target reinstalls.
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint bench doctor clean help

help:
	@echo "make demo   set up .venv and run the default recipe end to end (CPU, tiny model)"
	@echo "make test   set up .venv with dev extras and run the whole test suite"
	@echo "make lint   ruff"
	@echo "make bench  benchmarks (tests/bench; not run by CI)"

$(STAMP): pyproject.toml constraints/cpu.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "mmjobs needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# constraints/cpu.txt pins the CPU build of torch (an open range pulls CUDA wheels).
	$(PY) -m pip install --quiet -c constraints/cpu.txt -e '.[train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmjobs doctor
	$(PY) -m mmjobs.demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check mmjobs tests

bench: $(STAMP)
	$(PY) -m tests.bench.run

doctor: $(STAMP)
	$(VENV)/bin/mmjobs doctor

clean:
	rm -rf $(VENV) .mmjobs .pytest_cache .ruff_cache
