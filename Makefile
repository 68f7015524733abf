# SpendGuard. `make demo` runs the main job on a local stack; `make test` runs every test.
# Both install what they need. Heavy builds are cached outside the clone.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/spendguard/target
PG_BIN ?= /usr/lib/postgresql/15/bin
export SPENDGUARD_PG_BIN ?= $(PG_BIN)
CARGO ?= cargo

.PHONY: deps control-plane test check fmt clippy bench demo demo-down

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

## test: every test (unit, integration on real PostgreSQL, crash drill, proto drift, real apiserver).
test: deps control-plane
	$(CARGO) test --workspace --locked --no-fail-fast

## check: formatting and lints, as CI runs them.
check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

fmt:
	$(CARGO) fmt --all

## bench: ledger reserve+commit throughput and latency (prints figures; see docs/benchmarks.md).
bench: deps
	$(CARGO) build --release --locked -p spendguard -p spendguard-bench
	$(CARGO_TARGET_DIR)/release/spendguard-bench ledger --spendguard-bin $(CARGO_TARGET_DIR)/release/spendguard $(BENCH_ARGS)

## demo: start PostgreSQL and the ledger, run a small budget scenario, print balances, clean up.
demo: deps control-plane
	$(CARGO) build --release --locked -p spendguard -p spendguard-bench
	$(CARGO_TARGET_DIR)/release/spendguard-bench demo --spendguard-bin $(CARGO_TARGET_DIR)/release/spendguard

demo-down:
	@pkill -f 'spendguard ledger' || true
