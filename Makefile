# The two commands (see README): `make demo` runs the main job on the embedded SynthTalk benchmark,
# `make test` runs the whole test suite. Both set up .venv on first use.
SHELL := /bin/bash
export HF_HUB_OFFLINE := 1
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup demo test
setup:
	@scripts/setup.sh

demo: setup
	@scripts/demo.sh

test: setup
	@scripts/test.sh
