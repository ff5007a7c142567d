# Reefline: `make demo` sets up and classifies real photos end to end; `make test` runs the tests.
CACHE ?= $(CURDIR)/.cache
export REEFLINE_CACHE := $(CACHE)

.PHONY: setup build up down status demo test bench bench-scale reset clean

## setup: install what is missing and fetch/build the cached assets (model, ONNX Runtime, broker, photos)
setup:
	scripts/setup.sh

## build: the service binaries (release)
build: setup
	cargo build --release --locked --bins

## up: start the local stack in the background and wait until it is ready
up: build
	python3 scripts/stack.py up

## down: stop the local stack
down:
	python3 scripts/stack.py down

status:
	python3 scripts/stack.py status

## demo: start the stack if needed and classify the real photos end to end
demo: up
	python3 scripts/demo.py

## test: unit and end-to-end tests on the real broker, registry, Postgres, ONNX Runtime and model
test: setup
	cargo test --workspace --locked

clean: down
	rm -rf target

## bench: single-process limit vs end-to-end throughput, latency at half peak, batch fill, RSS
bench: build
	target/release/reefline-bench $(BENCH_ARGS)

## bench-scale: the same with 1 and then 2 classifier instances
bench-scale: build
	target/release/reefline-bench --classifiers 1,2 $(BENCH_ARGS)

## reset: stop the stack and forget its broker data, registry and logs (.cache/run)
reset: down
	rm -rf $(CACHE)/run
