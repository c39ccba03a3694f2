# The two set-up commands (see README): `make demo` and `make test`.
# Both install their own Debian dependencies first.
BUILD ?= build
# The sanitizer tree: clang, ASan+UBSan and libFuzzer instrumentation, shared
# by the unit tests under sanitizers and the fuzzers (scripts/san-build.sh).
SAN_BUILD ?= build-san
JOBS ?= $(shell nproc)
FUZZ_SECONDS ?= 10
# Fuzzers running at once (each may use 2 GiB): not nproc on a big machine.
FUZZ_JOBS ?= 2

.PHONY: deps build install demo test unit-test asan-test fuzz-test e2e-test format lint clean

deps:
	@scripts/install-deps.sh
	@scripts/fetch-kernel.sh

define compile
	@cmake -S . -B $(BUILD) -G Ninja -DCELLA_WERROR=ON >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)
endef

build: deps
	$(compile)

# PREFIX=/usr/local by default; DESTDIR stages the tree for packaging. Builds
# without re-running deps (the build tree must exist: `make build` first).
PREFIX ?= /usr/local
install:
	@cmake -S . -B $(BUILD) -G Ninja -DCELLA_WERROR=ON >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) --target cella cella-init cella-agent
	@DESTDIR=$(DESTDIR) cmake --install $(BUILD) --prefix $(PREFIX)

demo: build
	@scripts/demo.sh $(BUILD)

# Every test: the normal build (unit + e2e), the unit tests under ASan/UBSan,
# and a short run of each fuzzer. The sanitizer tree compiles in the
# background, at the lowest priority, while the e2e tests run.
# The e2e fixtures' Debian rootfs download starts first, beside the compile.
test: deps
	@mkdir -p $(BUILD) && (tests/fixtures/fill_cache.sh >$(BUILD)/fixture-cache.log 2>&1 &)
	$(compile)
	@scripts/test-all.sh $(BUILD) $(SAN_BUILD) $(JOBS) $(FUZZ_SECONDS) $(FUZZ_JOBS)

unit-test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS) -L unit

e2e-test: build
	ctest --test-dir $(BUILD) --output-on-failure -L e2e

asan-test: deps
	@scripts/san-build.sh $(SAN_BUILD) $(JOBS)
	ctest --test-dir $(SAN_BUILD) --output-on-failure -j $(JOBS) -L unit

fuzz-test: deps
	@scripts/san-build.sh $(SAN_BUILD) $(JOBS)
	@scripts/run-fuzzers.sh $(SAN_BUILD) $(FUZZ_SECONDS) $(FUZZ_JOBS)

format:
	@git ls-files '*.cc' '*.h' | xargs clang-format -i

# clang-tidy 16 (14 cannot parse C++23's <expected> from libstdc++ 12; the
# concepts define is the same workaround as the fuzz build, see CMakeLists.txt).
TIDY_ARGS = --quiet --extra-arg=-std=gnu++2b --extra-arg=-U__cpp_concepts \
	--extra-arg=-D__cpp_concepts=202002L --extra-arg=-Wno-unknown-warning-option
lint: build
	@git ls-files '*.cc' '*.h' | xargs clang-format --dry-run -Werror
	@git ls-files 'src/*.cc' | xargs -P $(JOBS) -n 4 clang-tidy-16 -p $(BUILD) $(TIDY_ARGS)

clean:
	rm -rf $(BUILD) $(SAN_BUILD)
