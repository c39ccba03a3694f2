# The two set-up commands (see README): `make demo` and `make test`.
# Both install their own Debian dependencies first.
BUILD ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
JOBS ?= $(shell nproc)
FUZZ_SECONDS ?= 20
# Fuzzers running at once (each may use 2 GiB): not nproc on a big machine.
FUZZ_JOBS ?= 2

.PHONY: deps build install demo test unit-test asan-test fuzz-test e2e-test format lint clean

deps:
	@scripts/install-deps.sh
	@scripts/fetch-kernel.sh

build: deps
	@cmake -S . -B $(BUILD) -G Ninja -DCELLA_WERROR=ON >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

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
# and a short run of each fuzzer.
test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)
	$(MAKE) asan-test fuzz-test

unit-test: build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS) -L unit

e2e-test: build
	ctest --test-dir $(BUILD) --output-on-failure -L e2e

asan-test: deps
	@cmake -S . -B $(ASAN_BUILD) -G Ninja -DCELLA_WERROR=ON -DCELLA_SANITIZE=ON \
	  -DCMAKE_BUILD_TYPE=Debug >/dev/null
	@cmake --build $(ASAN_BUILD) -j $(JOBS) --target cella_unit_tests
	ctest --test-dir $(ASAN_BUILD) --output-on-failure -j $(JOBS) -L unit

fuzz-test: deps
	@CC=clang-16 CXX=clang++-16 cmake -S . -B $(FUZZ_BUILD) -G Ninja -DCELLA_WERROR=ON -DCELLA_FUZZ=ON \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	@cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzzers
	@scripts/run-fuzzers.sh $(FUZZ_BUILD) $(FUZZ_SECONDS) $(FUZZ_JOBS)

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
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD)
