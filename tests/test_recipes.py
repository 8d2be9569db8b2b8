"""Every shipped recipe parses and builds; every debug recipe trains with fast_dev_run; user mistakes
give one line and exit status 2."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from transformers import ResNetConfig, ResNetModel

from d4d.fit import build_cli
from tests.conftest import REPO, run_module

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
DEBUG_RECIPES = sorted((REPO / "recipes" / "debug").glob("*.yaml"))


def test_every_stage_has_a_debug_recipe():
    assert RECIPES, "no recipes found"
    assert {p.name for p in RECIPES} <= {p.name for p in DEBUG_RECIPES}


def _offline_overrides(recipe: Path, tmp_path: Path) -> list[str]:
    """Full recipes name hub weights that cannot be downloaded here: point them at a tiny local copy."""
    content = yaml.safe_load(recipe.read_text())
    overrides = ["--run_dir", str(tmp_path / "run")]
    if content["model"]["init_args"].get("backbone"):
        local = tmp_path / "tiny-resnet"
        ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                 layer_type="basic")).save_pretrained(local)
        overrides += ["--model.init_args.backbone", str(local)]
    return overrides


# Full recipes name hub weights; each stage's own tests build its full recipe on tiny local weights.
# Here: the classifier's full recipe and every debug recipe (debug recipes need no downloads).
@pytest.mark.parametrize("recipe", [REPO / "recipes" / "classifier.yaml"] + DEBUG_RECIPES,
                         ids=lambda p: str(p.relative_to(REPO)))
def test_recipe_parses_and_builds(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = build_cli(str(recipe), _offline_overrides(recipe, tmp_path))
    assert cli.model is not None and cli.datamodule is not None
    assert cli.trainer.default_root_dir == str(tmp_path / "run")
    assert cli.config.run_dir == str(tmp_path / "run")


def _debug_recipe_on(recipe: Path, data: Path, tmp_path: Path) -> Path:
    """A copy of a debug recipe whose data paths point at the test's synthetic shards."""
    text = recipe.read_text().replace("data/synthetic", str(data))
    out = tmp_path / recipe.name
    out.write_text(text)
    return out


# Every debug recipe runs one batch on the session's synthetic shards (8 frames, 32x32).
FAST_DEV_RUN_EXTRA = {"classifier.yaml": ["--data.init_args.image_size", "32"]}


@pytest.mark.parametrize("recipe", DEBUG_RECIPES, ids=lambda p: p.name)
def test_debug_recipe_fast_dev_run(recipe, synthetic_data, tmp_path):
    local = _debug_recipe_on(recipe, synthetic_data, tmp_path)
    extra = FAST_DEV_RUN_EXTRA.get(recipe.name, [])
    proc = run_module("d4d.fit", str(local), "--trainer.fast_dev_run", "true", "--run_dir", str(tmp_path / "run"),
                      "--data.init_args.num_workers", "0", *extra, timeout=300)
    assert "Traceback" not in proc.stderr
    assert "fast_dev_run" in proc.stdout + proc.stderr  # Lightning announces the 1-batch run


# ----------------------------------------------------------------------------------- user errors
def _fit_error(*args: str) -> str:
    proc = run_module("d4d.fit", *args, check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert "Traceback" not in proc.stderr
    assert last.startswith("d4d.fit: error: ")
    return last


DEBUG = "recipes/debug/classifier.yaml"


def test_missing_recipe_file():
    assert "nope.yaml: recipe file not found" in _fit_error("nope.yaml")


def test_misspelled_key_in_recipe(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((REPO / DEBUG).read_text().replace("dropout: 0.5", "dropuot: 0.5"))
    line = _fit_error(str(bad))
    assert str(bad) in line and "model.init_args.dropuot" in line and "'dropout'" in line


def test_misspelled_trainer_key_in_recipe(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((REPO / DEBUG).read_text().replace("max_epochs: 15", "max_epoch: 15"))
    line = _fit_error(str(bad))
    assert "trainer.max_epoch" in line and "'max_epochs'" in line


def test_unknown_override_is_not_abbreviated():
    assert "--trainer.max_epoch" in _fit_error(DEBUG, "--trainer.max_epoch", "3")


def test_bad_value_names_key_and_value():
    line = _fit_error(DEBUG, "--model.init_args.dropout", "high")
    assert "model.init_args.dropout" in line and "high" in line and "float" in line


def test_invalid_yaml(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: [1\n")
    assert "not valid YAML" in _fit_error(str(bad))


def test_missing_data_leaves_no_run_behind(tmp_path):
    line = _fit_error(DEBUG, "--data.init_args.train_shards", str(tmp_path / "none"), "--run_dir", str(tmp_path / "run"))
    assert "data.train_shards" in line and str(tmp_path / "none") in line
    assert not (tmp_path / "run" / "wandb").exists()
