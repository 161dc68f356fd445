# Every target installs what it needs first, so a fresh machine needs nothing done by hand.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install -c constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: install test lint demo eval-demon world-towers fit-tiny clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pinned pair keeps pip from resolving another build through a dependency.
	$(PIP) -q torch torchvision
	$(PIP) -q -e ".[dev]"
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src data_modules callbacks tests benchmarks
	$(BIN)/ruff format --check src data_modules callbacks tests benchmarks

# The whole method on the embedded world: world, stage 0, stages 1-3, evaluation, demo_out/report.md.
# Running it again resumes where it stopped.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m morph_lightning demo

# DEMON (the paper's Table 3): `make eval-demon DEMON_DIR=DEMON-Core CKPT=stage3.ckpt [OUT=...]` scores a
# model on the published benchmark; with neither set, the demo's stage-3 model on the world's own
# DEMON-layout split (run `make demo` first). Running it again resumes; see docs/evaluation.md.
DEMON_DIR ?=
CKPT      ?=
eval-demon: install
ifeq ($(DEMON_DIR)$(CKPT),)
	HF_HUB_OFFLINE=1 $(BIN)/python -m morph_lightning evaluate demon --data data/world/demon \
		--checkpoint runs/world/stage3/last.ckpt --out $(or $(OUT),eval_out/world_demon)
else
	@test -n "$(DEMON_DIR)" -a -n "$(CKPT)" || { echo "eval-demon: set both DEMON_DIR and CKPT (or neither, for the world)"; exit 2; }
	HF_HUB_OFFLINE=1 $(BIN)/python -m morph_lightning evaluate demon --data $(DEMON_DIR) \
		--checkpoint $(CKPT) --out $(or $(OUT),eval_out/demon)
endif

# The world's stage-0 towers that the demo starts from (towers/world/), trained again from scratch
# (deterministic, about 35 min on 2 cores); prints their quality, also written to towers/world/quality.json.
world-towers: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m morph_lightning world-towers

# The three stages on the CPU at toy size, each starting from the previous one's checkpoint.
fit-tiny: install
	$(BIN)/python -m morph_lightning fit --config tiny/stage1.yaml
	$(BIN)/python -m morph_lightning fit --config tiny/stage2.yaml
	$(BIN)/python -m morph_lightning fit --config tiny/stage3.yaml

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache
