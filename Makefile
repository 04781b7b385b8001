# mqlite — build, run and test. `make run` and `make test` install what is missing first.
SWIFT ?= swift
PYTHON ?= python3
CONFIG ?= config/mqlite.conf
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages: Lua 5.4 (built against), the test clients (mosquitto_pub/_sub), and Mosquitto
# itself (mosquitto_passwd for the plugin tests, and the broker `make bench` compares against), and
# Chromium (headless: a real browser speaks MQTT over a WebSocket listener in the interop tests).
APT_PACKAGES := liblua5.4-dev libsqlite3-dev mosquitto mosquitto-clients openssl chromium
PY_MODULES := paho.mqtt pytest
PY_PACKAGES := paho-mqtt pytest

.PHONY: deps test-deps build build-release run test test-tsan bench bench-startup alloc-check clean fuzz-build fuzz fuzz-smoke

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; $(SUDO) apt-get update && $(SUDO) apt-get install -y $$missing; fi

test-deps: deps
	@$(PYTHON) -c "import $(firstword $(PY_MODULES)), $(lastword $(PY_MODULES))" 2>/dev/null || $(PYTHON) -m pip install -q $(PY_PACKAGES)

build: deps
	$(SWIFT) build

build-release: deps
	$(SWIFT) build -c release

run: build-release
	.build/release/mqlite -c $(CONFIG)

# One build of everything, then every test target from it: the Swift unit and integration tests,
# the hot path's allocation counts (debug thresholds), then the interop tests (mosquitto clients,
# paho-mqtt) against the built binary.
test: test-deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build
	LD_PRELOAD=$(CURDIR)/.build/debug/libMallocInterposerSwift.so .build/debug/mqlite-alloc bench/allocations.json
	MQLITE_BIN=.build/debug/mqlite $(PYTHON) -m pytest -q Tests/interop
	$(MAKE) fuzz-smoke

# The Swift tests under ThreadSanitizer (docs/ARCHITECTURE.md, Threads): a debug build of every
# module with --sanitize=thread in its own scratch folder; the first race fails the run. The
# suppressions are for known false positives in third-party code only, each with its reason.
# MQLITE_TSAN gives TSan the Mutex hand-offs it cannot see (Sources/MQTTCore/TSanMutex.swift).
# The tests run one at a time (--no-parallel): 5-15x slower, a CPU-bound test holds a thread of
# the test pool (one per core) long enough that the broker of a test waiting behind it closes
# its client for connect_timeout. Not part of `make test`.
TSAN_FLAGS := --sanitize=thread -Xswiftc -DMQLITE_TSAN --scratch-path .build-tsan
TSAN_OPTIONS ?= halt_on_error=1 second_deadlock_stack=1 suppressions=$(CURDIR)/Tests/tsan-suppressions.txt

test-tsan: deps
	$(SWIFT) build --build-tests $(TSAN_FLAGS)
	TSAN_OPTIONS="$(TSAN_OPTIONS)" $(SWIFT) test --skip-build --no-parallel $(TSAN_FLAGS)

# Fuzzing (docs/FUZZING.md): one libFuzzer build (its own scratch folder: every module built with
# coverage and ASan), then each target for FUZZ_SECONDS. `make test` ends with the short run.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= decoder connection json config proxy
FUZZ_SMOKE_SECONDS ?= 15
FUZZ_SMOKE_TARGETS ?= decoder connection json config proxy

fuzz-build: deps
	$(SWIFT) build --scratch-path .build-fuzz --product mqlite-fuzz --sanitize=fuzzer -Xswiftc -sanitize=fuzzer,address

fuzz: fuzz-build
	Fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# FUZZ_SMOKE_SECONDS for each of FUZZ_SMOKE_TARGETS (15 s x 5: 75 s in all); fails on any
# crash or hang.
fuzz-smoke: fuzz-build
	Fuzz/run.sh $(FUZZ_SMOKE_SECONDS) $(FUZZ_SMOKE_TARGETS)

# Side by side with Mosquitto (release build, pinned with taskset); writes bench/results.md.
# Then the hot path's allocation counts against the thresholds in bench/allocations.json.
bench: build-release
	$(PYTHON) bench/run.py
	$(MAKE) alloc-check

# Startup on a store of 1,000,000 retained messages and 100,000 offline sessions (docs/BENCHMARKS.md).
bench-startup: build-release
	$(PYTHON) bench/startup.py

alloc-check: build-release
	LD_PRELOAD=$(CURDIR)/.build/release/libMallocInterposerSwift.so .build/release/mqlite-alloc bench/allocations.json

clean:
	rm -rf .build .build-fuzz .build-tsan
