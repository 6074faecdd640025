# The two commands of the README. Both set up .venv on first use (idempotent), then run.
#   make workbook   the whole workbook on the embedded default (slmops run, default profile)
#   make test       the test suite (pytest: unit, papermill chapters, CLI, bad input, nbdev_test)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Offline by design: models and data are built or shipped by the package, never downloaded.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: workbook test setup clean-cache

setup: $(STAMP)

$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: unpinned, pip would fetch the newest CUDA build (several GB).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

workbook: $(STAMP)
	$(OFFLINE) $(BIN)/slmops run --profile default

test: $(STAMP)
	$(OFFLINE) SLMOPS_CACHE=$(CURDIR)/.cache/test $(BIN)/python -m pytest tests

clean-cache:
	rm -rf .cache
