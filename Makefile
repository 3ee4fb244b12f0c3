# Makefile — the short way in. `make demo` and `make test` do every set-up step on a fresh Debian
# machine (packages, configure, build) and then run. The real build is CMake (CMakeLists.txt).
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?= -DCMAKE_BUILD_TYPE=Release

.PHONY: all deps build demo test test-asan test-valgrind clean model

all: build

deps:
	./scripts/install-deps.sh

$(BUILD)/CMakeCache.txt: | deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

# Generates 32 tokens with the embedded default model (seeded random GPT-2 Medium weights: the speed
# and memory are real, the text is not), then the quick comparison (host/cli/cmd_compare.c): a 256-token
# prompt and 32 new tokens under the plain cache and under the sink plugin with a 64-token budget, so the
# second run really evicts; printed side by side: KV held, tokens/s, agreement of the greedy tokens.
demo: build
	$(BUILD)/kvhost generate --model random:gpt2-medium --prompt "The history of the city" --max-new 32
	$(BUILD)/kvhost --model random:gpt2-medium --plugins sink.so --set cache.budget=64 --set cache.slack=8 \
	  --prompt-tokens 256 --max-new 32 --warmup 1 --repeats 1

# Builds everything and runs every test suite, then the same suite under ASan+UBSan (build-asan/) and
# a valgrind memcheck of an end-to-end generate with plugins (docs/security.md).
test: build
	cd $(BUILD) && ctest --output-on-failure -j 1
	$(MAKE) test-asan test-valgrind

test-asan: deps
	./scripts/ci_sanitize.sh

test-valgrind: build
	BUILD=$(BUILD) ./scripts/ci_valgrind.sh

# Rebuilds the stand-in that uses its context, models/gpt2-tiny-copy (docs/fidelity.md): the corpus from
# Debian packages, ../shared/models/gpt2-tiny-wt widened with a hand-set copy circuit (one CPU thread, 2.5 to
# 7.5 min on a 2-core VM), export in the Hugging Face layout, golden outputs. Not part of
# `make test`: the tests that need the model skip when it is absent.
model: build
	WORK=$(BUILD)/fidelity KVHOST=$(BUILD)/kvhost ./tools/fidelity/make_model.sh

clean:
	rm -rf $(BUILD) build-asan build-valgrind build-fuzz
