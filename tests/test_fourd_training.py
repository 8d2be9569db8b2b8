"""4dgen training plumbing: a checkpoint every 0.1 epoch end to end (``python -m d4d.fit`` on the debug
recipe), and the ``scene_optimisation`` contract (hparam -> checkpoint -> OptimConfig of consumers)."""
from __future__ import annotations

import re

import pytest
import torch

from d4d.fourd.optimise import OptimConfig
from d4d.modules.fourdgen import FourDGenModule, load_network, scene_optimisation_config
from d4d.utils.errors import UserError
from tests.conftest import REPO, run_module

TINY = {"type": "vit", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "image_size": 32, "patch_size": 8}


def test_debug_recipe_saves_a_checkpoint_every_tenth_of_an_epoch(synthetic_data, tmp_path):
    """epoch_length 80 at batch size 4 = 20 optimizer steps per epoch, so every_epochs 0.1 = every 2
    steps: a run stopped after 7 steps saves at steps 2, 4, 6, then at the end (7), and ``last``.
    The recipe is used as shipped except ``save_top_k`` (all kept, to see every save)."""
    run = tmp_path / "run"
    text = (REPO / "recipes" / "debug" / "4dgen_224_linear.yaml").read_text()
    assert text.count("save_top_k: 2") == 1
    recipe = tmp_path / "4dgen_224_linear.yaml"
    recipe.write_text(text.replace("save_top_k: 2", "save_top_k: -1"))
    run_module("d4d.fit", str(recipe), "--run_dir", str(run),
               "--data.init_args.train_shards", str(synthetic_data / "train"),
               "--data.init_args.val_shards", str(synthetic_data / "val"),
               "--data.init_args.test_shards", str(synthetic_data / "test"),
               "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
               "--data.init_args.epoch_length", "80", "--data.init_args.image_sizes", "[[16, 16]]",
               "--data.init_args.num_frames", "2", "--model.init_args.encoder_config.image_size", "16",
               "--trainer.max_steps", "7", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1",
               "--model.init_args.val_plots", "0", timeout=600)
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    steps = sorted(int(m.group(1)) for f in files if (m := re.search(r"step(\d+)\.ckpt$", f)))
    assert steps == [2, 4, 6, 7], files
    assert "last.ckpt" in files
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 7 and last["d4d_stage"] == "4dgen"
    # the debug recipe's small scene-optimisation defaults travel with the checkpoint
    _, meta = load_network(run / "checkpoints" / "last.ckpt")
    assert meta["scene_optimisation"] == {"pose_steps": 5, "steps": 20}


def test_scene_optimisation_is_validated_and_saved(tmp_path):
    module = FourDGenModule(encoder_config=TINY, dec_dim=32, dec_depth=1, dec_heads=2,
                            scene_optimisation={"pose_steps": 3, "steps": 7})
    assert module.hparams["scene_optimisation"] == {"pose_steps": 3, "steps": 7}
    with pytest.raises(UserError, match="model.scene_optimisation: unknown key 'step'"):
        FourDGenModule(encoder_config=TINY, dec_dim=32, dec_depth=1, dec_heads=2, scene_optimisation={"step": 3})
    with pytest.raises(UserError, match=r"model.scene_optimisation.steps must be a int"):
        FourDGenModule(encoder_config=TINY, dec_dim=32, dec_depth=1, dec_heads=2, scene_optimisation={"steps": 2.5})


def test_consumers_config_precedence():
    """Explicit flag, else the checkpoint's hparam, else the defaults; old checkpoints lack the key."""
    stored = {"scene_optimisation": {"pose_steps": 3, "steps": 7}}
    assert scene_optimisation_config(stored) == OptimConfig(pose_steps=3, steps=7)
    assert scene_optimisation_config(stored, steps=11, pose_steps=None) == OptimConfig(pose_steps=3, steps=11)
    assert scene_optimisation_config({}) == OptimConfig()
    assert scene_optimisation_config({"scene_optimisation": None}) == OptimConfig()
    with pytest.raises(UserError, match="unknown key 'nope'"):
        scene_optimisation_config({}, nope=1)
