# Everything a fresh Debian/Ubuntu machine needs, then the thing you asked for.
#   make demo   set up, then a short tour (examples/tour.py: feature report, verified file copy,
#               echo round trip with stats; then python -m saferring demo: the safety promise)
#   make test   set up, then lint, type-check and run the test suite
#   make bench  set up, then the benchmarks in quick mode (make bench-full: the full rounds)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed

.PHONY: bench-full bench-deps test-kernel-6.1 all demo test test-other-pythons bench lint typecheck setup system-deps clean memcheck soak

all: test

system-deps:
	@if ! echo '#include <liburing.h>' | cc -E -x c - >/dev/null 2>&1; then \
	    echo "liburing-dev missing: installing it with apt-get"; \
	    $(SUDO) apt-get update && $(SUDO) apt-get install -y liburing-dev pkg-config gcc; \
	fi

$(STAMP): pyproject.toml setup.py build_ffi.py $(wildcard src/saferring/_cffi_src/*.[ch]) src/saferring/_version.py
	$(MAKE) system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,examples]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/tour.py
	$(PY) -m saferring demo

lint: setup
	$(PY) -m ruff check src tests benchmarks examples

typecheck: setup
	$(PY) -m mypy

test: setup lint typecheck
	$(PY) -m pytest -q tests --ignore=tests/memcheck
	$(MAKE) test-other-pythons

# The core tests on the newest CPython this machine has (pyenv), and on the oldest supported
# one (3.10), each in a venv of its own with saferring installed from the checkout.
test-other-pythons: setup
	@newest=$$(ls -d $$HOME/.pyenv/versions/3.* 2>/dev/null | sort -V | tail -n 1); \
	oldest=$$(ls -d $$HOME/.pyenv/versions/3.10.* 2>/dev/null | sort -V | tail -n 1); \
	if [ -z "$$newest$$oldest" ]; then echo "no pyenv CPythons found: skipping"; exit 0; fi; \
	for py in $$(printf '%s\n' $$newest $$oldest | sort -u); do \
	    v=$$(basename $$py); \
	    if [ "$$($$py/bin/python -c 'import sys; print(sys.version_info >= (3, 10))')" != True ]; then \
	        echo "CPython $$v is older than 3.10: skipping"; continue; fi; \
	    echo "== core tests on CPython $$v =="; \
	    [ -x .venv-$$v/bin/python ] || $$py/bin/python -m venv .venv-$$v || exit 1; \
	    rm -rf build; .venv-$$v/bin/python -m pip install -q '.[test]' || exit 1; \
	    (cd tests && ../.venv-$$v/bin/python -m pytest -q -p no:cacheprovider -m 'not slow' .) || exit 1; \
	done

# The suite (minus the `slow` stress tests) under Debian 12's stock 6.1 kernel, in an emulated
# guest that shares this checkout and its .venv (../shared/tools/kernel-6.1; KERNEL61=path to use
# another copy).  Tests that need what 6.1 lacks check the refusal instead, or skip saying why.
KERNEL61 ?= $(firstword $(wildcard ../shared/tools/kernel-6.1/run-on-6.1 /work/shared/tools/kernel-6.1/run-on-6.1))

test-kernel-6.1: setup
	@if [ -z "$(KERNEL61)" ]; then \
	    echo "test-kernel-6.1: run-on-6.1 not found (set KERNEL61=/path/to/run-on-6.1)" >&2; exit 1; fi
	SAFERRING_KERNEL_GUEST=1 $(KERNEL61) --dir "$(CURDIR)" --timeout 3600 -- \
	    .venv/bin/python -m pytest -q -p no:cacheprovider -m 'not slow' tests

# The torture scenarios and the safety tests under valgrind memcheck (tests/memcheck/memcheck.py
# says what that covers and what it cannot see): fails on any invalid access, bad free or use
# of uninitialised memory with a frame in saferring's extension, liburing or cffi.
memcheck: setup
	@command -v valgrind >/dev/null || { echo "valgrind missing: installing it with apt-get"; \
	    $(SUDO) apt-get update && $(SUDO) apt-get install -y valgrind; }
	$(PY) tests/memcheck/memcheck.py
	$(PY) -m pytest -q -p no:cacheprovider tests/memcheck

# The soak test (tests/soak): echo_server.py with 1,000 connections, 90 s per run
# (make test runs it for 20 s).
SOAK_SECONDS ?= 90
soak: setup
	SAFERRING_SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -q -p no:cacheprovider -rxX tests/soak

# The external load generators the benchmarks compare against: wrk (HTTP) and fio (reads).
bench-deps:
	@if ! command -v wrk >/dev/null || ! command -v fio >/dev/null; then \
	    echo "wrk/fio missing: installing them with apt-get"; \
	    $(SUDO) apt-get update && $(SUDO) apt-get install -y wrk fio; \
	fi

bench: setup bench-deps
	$(PY) benchmarks/run.py --quick

bench-full: setup bench-deps
	$(PY) benchmarks/run.py --full

clean:
	rm -rf build dist src/*.egg-info src/saferring/_uring.c src/saferring/*.so src/saferring/*.o .venv .venv-3.*
