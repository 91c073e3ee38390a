# memvisor: build, run, test, lint, bench. `make test` is what CI runs.
CARGO ?= cargo

.PHONY: build run test lint fuzz bench plot clean

build:
	$(CARGO) build --release

run: build
	./target/release/memvisor run

test:
	$(CARGO) test --release -- --test-threads=2

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# The property tests (parsers of sizes, durations and workload specs; the report channel, messages,
# map files and guest images; the balloon's virtqueue walk) with many more cases than `make test` runs: about a minute or two.
FUZZ_CASES ?= 100000
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release --lib
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO) test --release --test props

# Figures for README: harvest cost, set-up and overhead by guest size, sampling round cost,
# estimator accuracy and sampling overhead, balloon reclaim and limit (a few minutes; needs /dev/kvm).
bench:
	$(CARGO) bench --bench harvest
	$(CARGO) bench --bench sampling
	$(CARGO) bench --bench access
	$(CARGO) bench --bench balloon
	$(CARGO) bench --bench swap

# README's picture: the default run (seeded) as JSON, drawn by `memvisor plot` (needs /dev/kvm).
plot: build
	./target/release/memvisor run --seed 1 --json > target/default-run.jsonl
	./target/release/memvisor plot target/default-run.jsonl -o docs/default-run.png

clean:
	$(CARGO) clean
