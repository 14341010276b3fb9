# The targets behind README's two commands. Each creates the environment in .venv when it is missing.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.towerlab-installed
# torch 2.13.0 first, by itself: on CPU machines pip takes the CPU build from the local wheel cache; a range
# resolved together with other packages could pull a multi-GB CUDA build instead.
TORCH   ?= torch==2.13.0
OPEN_CLIP ?= open-clip-torch==3.3.0

.PHONY: setup demo test test-system test-unit bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]" "$(TORCH)"  # torch named again: nothing may upgrade it
	# open-clip-torch without its dependencies (torchvision and timm would pull a CUDA torch, and PyPI's torchvision
	# fails to import beside a CPU build): towerlab reads its CLIP BPE vocabulary file (model.text.tokenizer=clip_bpe),
	# the tests use its tokenizer and open_clip.model as reference implementations
	$(BIN)/python -m pip install -q --no-deps "$(OPEN_CLIP)"
	@touch $(STAMP)

demo: setup
	$(BIN)/towerlab data prepare digits --out data/digits
	$(BIN)/towerlab train recipes/digits_clip.yaml

# Debian's Chromium for the MLflow UI test (headless); installed when missing (needs root and apt)
test-system:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: setup test-system
	$(BIN)/python -m pytest -q

test-unit: setup
	$(BIN)/python -m pytest -q -m "not ray and not integration and not slow"

bench: setup
	$(BIN)/python benchmarks/overhead.py

# docs/recipes.md, the recipe reference, from the schema's field docstrings (tests/unit/config/test_reference.py fails
# when it is stale)
docs: setup
	$(BIN)/towerlab recipes reference --write docs/recipes.md

clean:
	rm -rf results data mlruns.db mlartifacts .pytest_cache
