# Everything installs into .venv; torch is pinned to the CPU wheel that the machine ships on disk.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint test test-min demo clean

CORE := $(VENV)/.core

# what `unlearn` itself needs (the demo's install); not byte-compiled: the demo's one process
# compiles the modules it imports, a fraction of what pip would compile
$(CORE): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-compile torch==2.13.0
	$(BIN)/pip install --quiet --no-compile -e .
	touch $(CORE)

$(STAMP): $(CORE)
	# DeepSpeed (ZeRO-3, tested on CPU processes) compiles against the torch above
	$(BIN)/pip install --quiet --no-build-isolation 'deepspeed>=0.16'
	$(BIN)/pip install --quiet -e '.[test,bench]'
	# the suite starts many processes: each would compile what it imports afresh; as pip does,
	# files that do not compile are passed over (torch ships one written for Python 3.12)
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check unlearn tests bench tools
	$(BIN)/python tools/check_structure.py

test: $(STAMP)
	$(BIN)/python -m pytest

# on the lowest versions pyproject.toml allows (constraints/minimum.txt), every test that leans
# on transformers, peft, accelerate or rouge-score: loading, generation, the scorer and its golden
# files, every method, LoRA and merging, checkpoints and resuming, selection, the command line,
# the leak audit and the receipt's attack (the bench, which only combines these, is left out);
# the mechanics only: training-outcome bounds were measured on the current versions
# (tests/MARGINS.md), not on these, and the main run checks them
MIN_VENV := .venv-min
MIN_TESTS := tests/test_data.py tests/test_methods.py tests/test_evaluate.py \
	tests/test_architectures.py tests/test_locate.py tests/test_official_golden.py \
	tests/test_metrics.py tests/test_promises.py tests/test_unlearn.py tests/test_selection.py \
	tests/test_cli.py tests/test_audit.py tests/test_receipt.py

$(MIN_VENV)/.installed: pyproject.toml constraints/minimum.txt
	$(PY) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/pip install --quiet torch==2.13.0
	$(MIN_VENV)/bin/pip install --quiet -c constraints/minimum.txt -e '.[test]'
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pytest -m "not outcome" $(MIN_TESTS)

demo: $(CORE)
	$(BIN)/unlearn demo --out runs/demo

clean:
	rm -rf $(VENV) $(MIN_VENV) runs
