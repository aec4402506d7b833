# The project's one entry point. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23" "maturin>=1.8,<2"
	touch $@

.PHONY: develop
develop: $(VENV)/.installed ## Build the extension (dev profile) into .venv with the test, torch, jax and tensorflow extras
	rm -f python/distsrv/_native*.so
	maturin develop --quiet --extras test,torch,jax,tensorflow

.PHONY: develop-release
develop-release: $(VENV)/.installed ## Build the extension optimised, for benchmarks
	rm -f python/distsrv/_native*.so
	maturin develop --quiet --release --extras test,torch,jax,tensorflow

.PHONY: demo
demo: develop ## Set up and run the main job: a local cluster at work
	distsrv demo

.PHONY: lint
lint: develop ## Formatting, clippy, ruff, mypy, the import contracts and the stub check
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	python rust/check_layers.py
	ruff check python tests benches
	ruff format --check python tests benches
	mypy
	lint-imports
	python -m mypy.stubtest distsrv._native --allowlist .stubtest-allowlist

.PHONY: test
test: lint fuzz-check slurm-tools ## Set up and run every check and test: Rust and Python
	cargo test
	cargo bench -- --quick --noplot
	python -m pytest
	$(MAKE) --no-print-directory wheel-check

# tests/test_slurm.py runs the main job under a one-node Slurm it starts and stops; as root (CI),
# Debian's slurm-wlm and munge are installed for it.
.PHONY: slurm-tools
slurm-tools:
	@if [ "$$(id -u)" = 0 ]; then tests/slurm/cluster.sh install; \
	else echo "not root: tests/test_slurm.py will be skipped"; fi

WHEEL_VENV := target/wheel-venv

.PHONY: wheel
wheel: $(VENV)/.installed ## Build the release wheel (abi3, Python 3.11+) into target/wheels
	rm -rf target/wheels
	maturin build --quiet --release --out target/wheels

.PHONY: wheel-check
wheel-check: wheel ## Install the wheel alone in a fresh virtualenv and use it there, outside the checkout
	rm -rf $(WHEEL_VENV)
	python3 -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet target/wheels/distsrv-*.whl
	cd /tmp && env -u PYTHONPATH -u VIRTUAL_ENV $(abspath $(WHEEL_VENV))/bin/python $(abspath tests/wheel_smoke.py)

# Decoders of peer bytes under coverage-guided fuzzing (fuzz/): libFuzzer through cargo-fuzz,
# which builds on the stable toolchain with RUSTC_BOOTSTRAP.
FUZZ_TARGETS := chunk_parser tensor_messages server_def call_values link_messages
FUZZ_SECONDS ?= 120
FUZZ_RUN := RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -O

.PHONY: fuzz-tools
fuzz-tools:
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2

.PHONY: fuzz
fuzz: fuzz-tools ## Fuzz each decoder for FUZZ_SECONDS (default 120), adding what it finds to fuzz/corpus
	for target in $(FUZZ_TARGETS); do \
		$(FUZZ_RUN) $$target fuzz/corpus/$$target -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096 \
			|| exit 1; \
	done

.PHONY: fuzz-check
fuzz-check: fuzz-tools ## Replay fuzz/corpus and fuzz each decoder for seconds, keeping the corpus as it is
	found=$$(mktemp -d) && trap 'rm -rf "$$found"' EXIT && \
	for target in $(FUZZ_TARGETS); do \
		mkdir "$$found/$$target" && \
		$(FUZZ_RUN) $$target "$$found/$$target" fuzz/corpus/$$target -- -max_total_time=5 \
			-max_len=4096 || exit 1; \
	done

.PHONY: bench
bench: develop-release ## Run the benchmarks: Rust criterion, then distsrv beside its peers
	cargo bench
	python benches/bench_exchange.py
	python benches/bench_collectives.py
	python benches/bench_handlers.py
	python benches/bench_hosts.py

SOAK_SECONDS ?= 180
.PHONY: soak
soak: develop-release ## Run the main job's exchange pattern for SOAK_SECONDS (180): memory and descriptors stay flat
	python benches/soak.py --seconds $(SOAK_SECONDS)

.PHONY: clean
clean: ## Remove build outputs and the virtualenv
	cargo clean
	rm -rf $(VENV) python/distsrv/_native*.so tests/_generated
