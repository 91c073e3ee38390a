# memvisor: build, run, test, lint, bench. `make test` is what CI runs.
CARGO ?= cargo

.PHONY: build run test lint bench plot clean

build:
	$(CARGO) build --release

run: build
	./target/release/memvisor run

test:
	$(CARGO) test --release -- --test-threads=2

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# Figures for README: harvest cost, set-up and overhead by guest size, sampling round cost,
# estimator accuracy and sampling overhead (a few minutes; needs /dev/kvm).
bench:
	$(CARGO) bench --bench harvest
	$(CARGO) bench --bench sampling

# README's picture: the default run (seeded) as JSON, drawn by `memvisor plot` (needs /dev/kvm).
plot: build
	./target/release/memvisor run --seed 1 --json > target/default-run.jsonl
	./target/release/memvisor plot target/default-run.jsonl -o docs/default-run.png

clean:
	$(CARGO) clean
