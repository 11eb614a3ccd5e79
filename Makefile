# Everything installs into .venv; torch is pinned to the CPU wheel that the machine ships on disk.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lint test demo clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	# DeepSpeed (ZeRO-3, tested on CPU processes) compiles against the torch above
	$(BIN)/pip install --quiet --no-build-isolation 'deepspeed>=0.16'
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check unlearn tests bench tools
	$(BIN)/python tools/check_structure.py

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/unlearn demo --out runs/demo

clean:
	rm -rf $(VENV) runs
