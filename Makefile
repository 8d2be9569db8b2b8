# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, build the embedded synthetic data, train every stage briefly,
#               generate a 4D scene from a held-out image, evaluate, write a comparison report
#   make test   create .venv, install with the dev and optional extras, run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch, pinned and installed first so that nothing else makes pip pick a CUDA build.
TORCH  ?= torch==2.13.0
# dev (pytest) and every optional extra, so that no test is skipped for a missing package; a plain
# `pip install -e .` (no decord, pycolmap, wandb-workspaces) is what aarch64 clusters can install
# (there: make demo EXTRAS=dev)
EXTRAS ?= dev,video,eval,report
DATA   ?= data/synthetic
RUNS   ?= runs
PYTEST_ARGS ?=
# One OpenMP thread per process: the demo and the tests run several processes on a few cores, where
# oversubscribed torch threads are many times slower (override: make demo OMP_NUM_THREADS=8).
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS

.PHONY: install demo test data clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@touch $@

install: $(VENV)/.installed

# Embedded default data: procedural 4D scenes along the eight motions (train / val / test splits).
$(DATA)/.done: $(VENV)/.installed data_prep/synthetic.py Makefile
	$(PY) -m data_prep.synthetic --out $(DATA) --clips 320 --val-clips 64 --test-clips 64 --seed 0 --static-fraction 0.25
	@touch $@

data: $(DATA)/.done

# RealEstate10K shards from ../shared/data when it is there (seven real clips; skipped otherwise).
RE10K_RAW ?= ../shared/data/realestate10k
RE10K     ?= data/re10k
DEMO      := $(RUNS)/demo
STAGE_FIT  = $(PY) -m d4d.fit recipes/debug/$(1).yaml --run_dir $(DEMO)/$(1) --trainer.max_steps 10 \
             --trainer.limit_val_batches 1 --test_after_fit false

demo: $(DATA)/.done
	@echo "== 1/6 RealEstate10K shards from $(RE10K_RAW) (if present)"
	@if [ -d $(RE10K_RAW)/pose_files ]; then $(PY) -m data_prep.realestate10k --cameras $(RE10K_RAW)/pose_files \
	    --videos $(RE10K_RAW)/videos --out $(RE10K)/test --size 64x64; else echo "   $(RE10K_RAW) absent: skipped"; fi
	@echo "== 2/6 camera-motion classifier: Table 3 episodic schedule at 64x64 (the longest step, a few minutes)"
	$(PY) -m d4d.fit recipes/debug/classifier.yaml --run_dir $(DEMO)/classifier
	@echo "== 3/6 dynamic, static and 4D generator stages: 10 steps each from their debug recipes"
	$(call STAGE_FIT,dynamic)
	$(call STAGE_FIT,static)
	$(call STAGE_FIT,4dgen_224_linear)
	@echo "== 4/6 one image -> motion -> videos -> 4D scenes"
	$(PY) -m d4d.generate $(DATA)/heldout/sample_0.jpg --motion auto --selector $(DEMO)/classifier/checkpoints/last.ckpt \
	    --module both --dynamic $(DEMO)/dynamic/checkpoints/last.ckpt --static $(DEMO)/static/checkpoints/last.ckpt \
	    --fourd $(DEMO)/4dgen_224_linear/checkpoints/last.ckpt --frames 9 \
	    --threads 1 --out $(DEMO)/generate
	@echo "== 5/6 evaluation on the synthetic test split (and the real clips when present)"
	$(PY) -m d4d.evaluate --shards $(DATA)/test --out $(DEMO)/eval/synthetic --dynamic $(DEMO)/dynamic/checkpoints/last.ckpt \
	    --static $(DEMO)/static/checkpoints/last.ckpt --fourd $(DEMO)/4dgen_224_linear/checkpoints/last.ckpt \
	    --fourd-max-points 3000 --covisibility depth --baseline repeat-first --max-clips 4 --frames 5 --steps 8 --lpips off
	@if [ -f $(RE10K)/test/manifest.json ]; then $(PY) -m d4d.evaluate --shards $(RE10K)/test --out $(DEMO)/eval/re10k \
	    --dynamic $(DEMO)/dynamic/checkpoints/last.ckpt --baseline repeat-first --frames 5 --steps 8 --lpips off; fi
	@echo "== 6/6 comparison report"
	re10k=$$([ -f $(DEMO)/eval/re10k/aggregate.json ] && echo "--eval $(DEMO)/eval/re10k=re10k"); \
	$(PY) -m d4d.report --out $(DEMO)/report --title "d4d demo: debug recipes on a CPU" \
	    --eval $(DEMO)/eval/synthetic=synthetic $$re10k \
	    --wandb-dir $(DEMO)/classifier=classifier --wandb-dir $(DEMO)/dynamic=dynamic \
	    --wandb-dir $(DEMO)/static=static --wandb-dir $(DEMO)/4dgen_224_linear=4dgen
	@echo
	@echo "demo outputs in $(DEMO):"
	@echo "  checkpoints, config.yaml, offline wandb runs: $(DEMO)/<stage>/"
	@echo "  videos, 4D scenes, summary pictures:          $(DEMO)/generate/{dynamic,static}/ (python -m d4d.view $(DEMO)/generate/dynamic)"
	@echo "  evaluation (per clip and aggregate):          $(DEMO)/eval/"
	@echo "  report:                                       $(DEMO)/report/report.md (and .html)"

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DATA) $(RUNS)
