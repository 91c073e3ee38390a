# memvisor: build, run, test, lint, bench. `make test` is what CI runs.
CARGO ?= cargo

.PHONY: build run test lint bench clean

build:
	$(CARGO) build --release

run: build
	./target/release/memvisor run

test:
	$(CARGO) test --release -- --test-threads=2

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

bench: build
	$(CARGO) bench --bench harvest
	./scripts/bench.sh

clean:
	$(CARGO) clean
