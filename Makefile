# SpendGuard. `make demo` runs the main job on a local stack; `make test` runs every test.
# Both install what they need. Heavy builds are cached outside the clone.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/spendguard/target
# Incremental caches only help interactive rebuilds; in the shared target dir they grow by
# gigabytes. Never build two checkouts into the target dir at once: workspace artifacts are keyed
# by package, not by checkout path, so concurrent builds overwrite each other's outputs.
export CARGO_INCREMENTAL ?= 0
PG_BIN ?= /usr/lib/postgresql/15/bin
export SPENDGUARD_PG_BIN ?= $(PG_BIN)
CARGO ?= cargo

.PHONY: deps control-plane sdk-venv moto-venv prune-target test check fmt clippy bench demo demo-down

## deps: install PostgreSQL 15 and protoc from Debian when missing.
deps:
	@missing=""; \
	[ -x "$(PG_BIN)/initdb" ] || missing="$$missing postgresql-15"; \
	command -v protoc >/dev/null || missing="$$missing protobuf-compiler"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@id postgres >/dev/null 2>&1 || (echo "no postgres user; install postgresql-15" && exit 1)

## control-plane: build kube-apiserver, etcd, kubectl and helm from Go modules (cached in
## ~/.cache/spendguard/control-plane; about 7 minutes cold on 2 cores, instant when cached).
control-plane:
	bash e2e/build-control-plane.sh

## test: every test (unit, integration on real PostgreSQL, crash drill, proto drift, real apiserver,
## the Python SDK with the real openai/anthropic/LangChain/Pydantic-AI clients).
test: deps control-plane sdk-venv moto-venv prune-target
	$(CARGO) test --workspace --locked --no-fail-fast

## prune-target: old versions and per-feature-set variants of every crate pile up in the shared
## target dir; drop build outputs untouched for three days (rebuilt when needed).
prune-target:
	@for profile in debug release production; do \
	  if [ -d "$(CARGO_TARGET_DIR)/$$profile/deps" ]; then \
	    find "$(CARGO_TARGET_DIR)/$$profile/deps" "$(CARGO_TARGET_DIR)/$$profile/build" -mindepth 1 -maxdepth 1 -mtime +3 -exec rm -rf {} + ; \
	  fi; \
	done

## check: formatting and lints, as CI runs them.
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## bench: ledger and proxy benchmarks (print figures; see docs/benchmarks.md). Built with the
## `production` profile (fat LTO), as a deployment should be: ~11 min cold on two cores. The
## last two runs keep calls in flight (20,000 open reservations; a 2 s upstream), as production
## always has: a statement plan that scales with them shows there and nowhere else.
bench: deps
	$(CARGO) build --profile production --locked -p spendguard -p spendguard-bench -p spendguard-mock-provider
	$(CARGO_TARGET_DIR)/production/spendguard-bench ledger --spendguard-bin $(CARGO_TARGET_DIR)/production/spendguard $(BENCH_ARGS)
	$(CARGO_TARGET_DIR)/production/spendguard-bench proxy --spendguard-bin $(CARGO_TARGET_DIR)/production/spendguard $(PROXY_BENCH_ARGS)
	@echo "== with calls in flight, as production always has (docs/benchmarks.md, session 8)"
	$(CARGO_TARGET_DIR)/production/spendguard-bench ledger --spendguard-bin $(CARGO_TARGET_DIR)/production/spendguard --clients 64 --open-reservations 20000 $(IN_FLIGHT_BENCH_ARGS)
	$(CARGO_TARGET_DIR)/production/spendguard-bench proxy --spendguard-bin $(CARGO_TARGET_DIR)/production/spendguard --rates 1000 --upstream-latency-ms 2000 $(IN_FLIGHT_PROXY_BENCH_ARGS)

## sdk-venv: the Python SDK's test venv (cached in ~/.cache/spendguard/venv).
sdk-venv:
	bash sdk/python/scripts/venv.sh >/dev/null

## moto-venv: moto's server mode, standing in for AWS KMS/S3 in tests (cached likewise).
moto-venv:
	bash runtime/testkit/moto/moto-venv.sh >/dev/null

## demo: PostgreSQL, control plane, ledger, operator, mock provider and a sidecar; a small agent on
## the real openai client runs until the hard cap says STOP; `kubectl get budgets` before and after.
demo: deps control-plane sdk-venv
	$(CARGO) build --release --locked -p spendguard -p spendguard-bench -p spendguard-mock-provider
	$(CARGO_TARGET_DIR)/release/spendguard-bench demo --spendguard-bin $(CARGO_TARGET_DIR)/release/spendguard

demo-down:
	@pkill -f 'spendguard (ledger|operator|sidecar)' || true
	@pkill -f 'spendguard-mock-provider' || true
