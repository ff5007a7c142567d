# Reefline: `make demo` sets up and classifies real photos end to end; `make test` runs the tests.
CACHE ?= $(CURDIR)/.cache
export REEFLINE_CACHE := $(CACHE)

.PHONY: setup setup-tests build build-bench up down status demo test bench bench-scale bench-wait bench-mixed bench-feed soak reset clean

## setup: install what is missing and fetch/build the cached assets (model, ONNX Runtime, photos) and
## the broker (built once per user under $${XDG_CACHE_HOME:-~/.cache}/reefline; REEFLINE_TOOLS moves it)
setup:
	scripts/setup.sh

## setup-tests: setup, and what only the tests use (Chromium and Playwright, promtool, Azurite, the
## validators' and test servers' venvs)
setup-tests:
	scripts/setup.sh tests

## build: the services', the registry's and the CLI's binaries (release); not the tests' own
build: setup
	@echo "build: the services in release: about 9 minutes on 2 cores the first time, seconds once built"
	cargo build --release --locked --bins -p reefline-ingest -p reefline-classifier -p reefline-sink \
		-p reefline-tools -p reefline-cli

## build-bench: build, and the benchmarks' own binaries (the photo server and load tool, the stage costs)
build-bench: build
	cargo build --release --locked --bins --example stage_costs -p reefline-e2e

## up: start the local stack (release build) in the background and wait until it is ready; a service
## running another build (the demo's) or an older binary is restarted on the release one
up: build
	python3 scripts/stack.py up

## down: stop the local stack
down:
	python3 scripts/stack.py down

status:
	python3 scripts/stack.py status

## demo: classify the real photos end to end on the running stack; with none running, set up only
## what the demo runs, build the broker and the services' quick (debug) build side by side, and
## start the stack on it (`make up` later moves it to release)
demo:
	@python3 scripts/stack.py ready || { scripts/setup.sh demo && PROFILE_DIR=debug python3 scripts/stack.py up; }
	python3 scripts/demo.py

## test: formatting and lints, then unit and end-to-end tests on the real broker, registry,
## Postgres, ONNX Runtime and model
test: setup-tests
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	scripts/sqlx-prepare.sh --check
	promtool check config ops/prometheus/prometheus.yml
	promtool test rules ops/prometheus/rules_test.yml
	python3 scripts/check_deploy.py
	cargo test --workspace --locked

clean: down
	rm -rf target

## bench: single-process limit, the make-up stack end to end, the same on memory://, and the Celery
## design, on the same 252 real photos and on their 12-megapixel versions; medians of 3 runs; then
## the CPU cost of each stage (BENCH_ARGS, e.g. "--runs 5 --images 2000" or "--large-only --jpeg-scale-margin 1")
bench: build-bench setup-tests
	python3 scripts/bench.py bench $(BENCH_ARGS)

## bench-scale: the make-up stack with 1, 2 and 4 classifier instances in one consumer group on the
## same photos: images/s against one, CPU per image (SCALE_ARGS, e.g. "--large --classifiers 1 2 4 8")
bench-scale: build-bench setup-tests
	python3 scripts/bench.py scale $(SCALE_ARGS)

## bench-wait: what 1,000 submissions waiting for their answers ("wait") cost the make-up stack's
## pipeline: its rate with them held against without, ingest's CPU and RSS (WAIT_ARGS, e.g. "--runs 1")
bench-wait: build-bench setup-tests
	python3 scripts/waiters.py $(WAIT_ARGS)

## bench-mixed: interactive answers beside a 20,000-photo feed, the feed's rate alone and beside
## them, and a second tenant's feed sharing the classifiers (MIXED_ARGS, e.g. "--without-lanes-too")
bench-mixed: build-bench setup-tests
	python3 scripts/mixed.py $(MIXED_ARGS)

## bench-feed: bulk feeds on the make-up stack: a 1,000,000-line feed through ingest alone (lines/s,
## RSS), a 10,000-photo CSV feed end to end against the same photos through /v1/classify, and 2,000
## photos as a feed from an S3 prefix (moto) against the same over HTTP
## (FEED_ARGS, e.g. "--lines 200000 --photos 2000" or "--s3-only --runs 3")
bench-feed: build-bench setup-tests
	python3 scripts/feedbench.py $(FEED_ARGS)

## soak: 100,000 requests through the make-up stack: rate per 10,000, ratio to memory://, idle CPU,
## broker disk, RSS (SOAK_ARGS, e.g. "--requests 20000 --no-memory")
soak: build-bench setup-tests
	python3 scripts/bench.py soak $(SOAK_ARGS)

## reset: stop the stack and forget its broker data, registry and logs (.cache/run)
reset: down
	rm -rf $(CACHE)/run
