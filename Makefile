# Two commands do all set-up on a fresh machine:
#   make demo   create .venv, install, build the embedded synthetic data, run the main job
#   make test   create .venv, install with dev extras, run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch, pinned and installed first so that nothing else makes pip pick a CUDA build.
TORCH  ?= torch==2.13.0
DATA   ?= data/synthetic
RUNS   ?= runs
PYTEST_ARGS ?=

.PHONY: install demo test data clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

# Embedded default data: procedural 4D scenes along the eight motions (train / val / test splits).
$(DATA)/.done: $(VENV)/.installed data_prep/synthetic.py
	$(PY) -m data_prep.synthetic --out $(DATA) --clips 320 --val-clips 64 --test-clips 64 --seed 0 --static-fraction 0.25
	@touch $@

data: $(DATA)/.done

demo: $(DATA)/.done
	$(PY) -m d4d.fit recipes/debug/classifier.yaml --run_dir $(RUNS)/demo/classifier
	$(PY) -m d4d.select $(DATA)/heldout/sample_0.jpg --checkpoint $(RUNS)/demo/classifier/checkpoints/last.ckpt
	@echo "demo outputs: $(RUNS)/demo (checkpoints, config.yaml, wandb offline run)"

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DATA) $(RUNS)
