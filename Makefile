# The two commands of the README. Both set up .venv on first use (idempotent), then run.
#   make workbook   the whole workbook on the embedded default (slmops run, default profile)
#   make test       the test suite (pytest: unit, papermill chapters, CLI, bad input, nbdev_test, the browser tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Offline by design: models and data are built or shipped by the package, never downloaded.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: workbook test setup clean-cache

setup: $(STAMP)

# llama-cpp-python compiles llama.cpp for this CPU (-march=native), AMX included where the CPU lists it. A VM can list AMX
# and not enable its tile registers (seen 2026-12-02 on a Xeon VM): the first quantized product dies on `ldtilecfg`, and the
# notebook's kernel with it. So no AMX on x86 (AVX-512 and the rest stay native); built here, never taken from pip's wheel
# cache, where a wheel built with AMX could wait.
LLAMA_PIN := $(shell grep -o 'llama-cpp-python==[0-9.]*' settings.ini)
NO_AMX    := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_SDIST := $(VENV)/share/slmops_nb
LLAMA_ENV := $(if $(filter x86_64,$(shell uname -m)),CMAKE_ARGS="-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'")

$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first and pinned: unpinned, pip would fetch the newest CUDA build (several GB).
	$(BIN)/python -m pip install -q torch==2.13.0
	# Its source release stays in the environment: llama.cpp's GGUF converter ships only there, and a run is offline.
	$(BIN)/python -m pip download -q --no-deps --no-binary :all: "$(LLAMA_PIN)" -d $(LLAMA_SDIST)
	$(LLAMA_ENV) $(BIN)/python -m pip install -q --no-cache-dir $(LLAMA_SDIST)/llama_cpp_python-$(lastword $(subst ==, ,$(LLAMA_PIN))).tar.gz
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

workbook: $(STAMP)
	$(OFFLINE) $(BIN)/slmops run --profile default

# One test process per core (pytest-xdist), the long whole-workbook runs first, one test at a time to whichever process
# is free; one thread each: two processes of two threads on two cores spin against each other and run slower than one.
# --durations: the slowest tests, in the log, to see where the time goes.
# The browser tests (tests/test_browser.py) drive Debian's Chromium through Playwright, whose own browser download
# cannot work offline; apt-get as root, or through sudo.
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

test: $(STAMP) $(CHROMIUM)
	$(OFFLINE) SLMOPS_CACHE=$(CURDIR)/.cache/test OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --maxschedchunk 1 --durations 30 tests

clean-cache:
	rm -rf .cache
