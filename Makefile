# Every target installs what it needs first, so a fresh machine needs nothing done by hand.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install -c constraints.txt
STAMP   := $(VENV)/.installed

.PHONY: install test lint demo ablations eval-demon eval-generation world-towers fit-tiny clean

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

# The ablation rows of Tables 7-8 on the world: stages 1-3 of the method and of each built row, seeds 0 1 2
# (runs/ablations/), each scored on the world's DEMON and editing splits; ablations_out/table.md. Running it
# again resumes; ARGS passes options, e.g. ARGS="--rows method wo_deconfound --seeds 0".
ablations: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m morph_lightning ablations $(ARGS)

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

# Generation (Tables 4 and 5): `make eval-generation CKPT=stage3.ckpt CLIP=clip-vit-large-patch14-dir
# CVS=clip-vit-base-patch32-dir [COCO_DIR=... FLICKR_DIR=... COCO_VAL_DIR=... MAGICBRUSH_DIR=...]` runs each set
# whose folder is given. Retrieval (Table 6): `RETRIEVAL_CKPT=` (a RetrievalProjection checkpoint,
# configs/retrieval_flickr.yaml) with `FLICKR_RETRIEVAL_DIR=` (LAVIS' flickr30k_test.json and the images)
# runs flickr30k-retrieval, with or without CKPT. With neither CKPT nor RETRIEVAL_CKPT: the demo's stage-3
# model (run `make demo` first) on the world's text-to-image and editing splits written in the COCO-caption
# and MagicBrush layouts (all-turn and final-turn), scored by L1 and by CLIP similarity / CVS under the
# world's own stage-0 image tower (not comparable with CLIP's numbers); and a retrieval projection fitted
# on the world (configs/world/retrieval.yaml; run again, it resumes from its last.ckpt and trains no more
# once finished), scored on the world's held-out images in the Flickr30K layout. Tables under eval_out/.
COCO_DIR ?=
FLICKR_DIR ?=
COCO_VAL_DIR ?=
MAGICBRUSH_DIR ?=
RETRIEVAL_CKPT ?=
FLICKR_RETRIEVAL_DIR ?=
CLIP ?=
CVS ?=
EVAL := HF_HUB_OFFLINE=1 $(BIN)/python -m morph_lightning evaluate
WORLD_TOWER := towers/world/vision.safetensors
eval-generation: install
ifeq ($(CKPT)$(RETRIEVAL_CKPT),)
	HF_HUB_OFFLINE=1 $(BIN)/python -m morph_lightning.evaluation.world_generation data/world data/world/generation
	$(EVAL) coco-t2i --data data/world/generation --checkpoint runs/world/stage3/last.ckpt \
		--out eval_out/world_t2i --limit 200 --option clip_model=$(or $(CLIP),$(WORLD_TOWER)) --option l1=true
	$(EVAL) magicbrush-edit --data data/world/generation/magicbrush --checkpoint runs/world/stage3/last.ckpt \
		--out eval_out/world_edit --limit 200 --option cvs_model=$(or $(CVS),$(WORLD_TOWER))
	$(EVAL) magicbrush-edit --data data/world/generation/magicbrush --checkpoint runs/world/stage3/last.ckpt \
		--out eval_out/world_edit_final --limit 200 --option cvs_model=$(or $(CVS),$(WORLD_TOWER)) --option setting=final-turn
	HF_HUB_OFFLINE=1 $(BIN)/python -m morph_lightning fit --config configs/world/retrieval.yaml --ckpt_path last
	$(EVAL) flickr30k-retrieval --data data/world/generation --checkpoint runs/world/retrieval/last.ckpt \
		--out eval_out/world_retrieval
else
	@test -z "$(RETRIEVAL_CKPT)$(FLICKR_RETRIEVAL_DIR)" -o \( -n "$(RETRIEVAL_CKPT)" -a -n "$(FLICKR_RETRIEVAL_DIR)" \) || { echo "eval-generation: set both RETRIEVAL_CKPT and FLICKR_RETRIEVAL_DIR (or neither)"; exit 2; }
	@test -z "$(CKPT)" -o \( -n "$(CLIP)" -a -n "$(CVS)" \) || { echo "eval-generation: with CKPT set CLIP and CVS (saved CLIP ViT-L/14 and ViT-B/32 folders)"; exit 2; }
	$(if $(and $(CKPT),$(COCO_DIR)),$(EVAL) coco-t2i --data $(COCO_DIR) --checkpoint $(CKPT) --out eval_out/coco_t2i --option clip_model=$(CLIP))
	$(if $(and $(CKPT),$(COCO_VAL_DIR)),$(EVAL) coco-val30k-t2i --data $(COCO_VAL_DIR) --checkpoint $(CKPT) --out eval_out/coco_val30k_t2i --option clip_model=$(CLIP))
	$(if $(and $(CKPT),$(FLICKR_DIR)),$(EVAL) flickr30k-t2i --data $(FLICKR_DIR) --checkpoint $(CKPT) --out eval_out/flickr30k_t2i --option clip_model=$(CLIP))
	$(if $(and $(CKPT),$(MAGICBRUSH_DIR)),$(EVAL) magicbrush-edit --data $(MAGICBRUSH_DIR) --checkpoint $(CKPT) --out eval_out/magicbrush_edit --option cvs_model=$(CVS))
	$(if $(RETRIEVAL_CKPT),$(EVAL) flickr30k-retrieval --data $(FLICKR_RETRIEVAL_DIR) --checkpoint $(RETRIEVAL_CKPT) --out eval_out/flickr30k_retrieval)
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
