"""Every ``python -m d4d.fit`` command in the README and docs/cluster.md, as written: parsed, built
(model, data module, trainer with its strategy) and prepared (``configure_model``: ``init_from``,
activation checkpointing), in a folder laid out as the commands expect. Hub weights cannot be
downloaded here, so tiny local copies replace them (appended overrides that change nothing else),
and ``--trainer.accelerator cpu`` replaces the recipes' GPUs. The strategy each command selects is
checked against the rule of ``docs/cluster.md`` (the deepspeed key; a command-line
``--deepspeed``/``--trainer.strategy`` replaces the recipe's other). Training itself on these
strategies runs in ``tests/test_gpu_path.py`` on the debug recipes."""
from __future__ import annotations

import json
import re
import shlex

import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy

from d4d.callbacks.strategies import AtomicDeepSpeedStrategy
from d4d.fit import build_cli
from d4d.utils.activation_checkpointing import count_checkpointed
from tests.conftest import REPO


def documented_fit_commands() -> list[tuple[str, list[str]]]:
    """``(source, argv after 'python -m d4d.fit')`` for every command in the docs' code blocks."""
    found = []
    for doc in ("README.md", "docs/cluster.md"):
        in_block, pending = False, ""
        for line in (REPO / doc).read_text().splitlines():
            if line.startswith("```"):
                in_block, pending = not in_block, ""
                continue
            if not in_block:
                continue
            text = pending + line
            if text.rstrip().endswith("\\"):
                pending = text.rstrip()[:-1] + " "
                continue
            pending = ""
            words = shlex.split(text, comments=True)
            if words[:3] == ["python", "-m", "d4d.fit"]:
                found.append((f"{doc}: {' '.join(words)}", words[3:]))
    return found


COMMANDS = documented_fit_commands()


def test_the_docs_hold_the_commands_this_test_knows():
    recipes = {args[0] for _, args in COMMANDS}
    assert {"recipes/dynamic.yaml", "recipes/static.yaml", "recipes/4dgen_512_dpt.yaml"} <= recipes
    assert any("--deepspeed" in args for _, args in COMMANDS)
    assert any("--trainer.strategy" in args for _, args in COMMANDS)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny local stand-ins for every hub model the full recipes name."""
    from transformers import DepthAnythingForDepthEstimation, Dinov2Config, Dinov2Model, ResNetConfig, ResNetModel

    from d4d.fourd.init import tiny_depth_anything_config
    from d4d.models.dynamic import build_tiny_wan, save_wan
    from tests.test_static_stage import _save_tiny_sd21

    root = tmp_path_factory.mktemp("weights")
    save_wan(build_tiny_wan(seed=1), root / "wan")
    _save_tiny_sd21(root / "sd21")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=14, image_size=56)).save_pretrained(root / "dinov2")
    DepthAnythingForDepthEstimation(tiny_depth_anything_config()).save_pretrained(root / "depth")
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                             layer_type="basic")).save_pretrained(root / "resnet")
    return root


def offline(recipe: str, weights) -> list[str]:
    """Overrides that point a recipe's hub ids at the tiny local weights."""
    name = recipe.split("/")[-1]
    if recipe.startswith("recipes/debug/"):
        return ["--trainer.accelerator", "cpu"]
    extra = {
        "classifier.yaml": ["--model.init_args.backbone", str(weights / "resnet")],
        "dynamic.yaml": ["--model.init_args.backbone", str(weights / "wan"), "--model.init_args.camera_hidden", "16"],
        "static.yaml": ["--model.init_args.unet", str(weights / "sd21"), "--model.init_args.vae", str(weights / "sd21"),
                        "--model.init_args.image_encoder", str(weights / "sd21")],
    }.get(name)
    if extra is None:  # the 4D generator
        extra = ["--model.init_args.encoder", str(weights / "dinov2"), "--model.init_args.init_depth",
                 str(weights / "depth"), "--model.init_args.dec_dim", "32", "--model.init_args.dec_depth", "2",
                 "--model.init_args.dec_heads", "2"]
    return extra + ["--trainer.accelerator", "cpu"]


def expected_strategy(recipe: str, args: list[str]) -> tuple[str, int | None]:
    """("deepspeed", ZeRO stage) or ("ddp"/"auto", None), from the rule in docs/cluster.md."""
    content = yaml.safe_load((REPO / recipe).read_text())
    preset = args[args.index("--deepspeed") + 1] if "--deepspeed" in args else None
    strategy = args[args.index("--trainer.strategy") + 1] if "--trainer.strategy" in args else None
    if preset is None and strategy is None:
        preset = content.get("deepspeed")
        strategy = None if preset else content.get("trainer", {}).get("strategy")
    if preset:
        path = REPO / "configs" / "deepspeed" / f"{preset}.json" if not preset.endswith(".json") else None
        stage = json.loads(path.read_text())["zero_optimization"]["stage"] if path else 2
        return "deepspeed", stage
    return (strategy or "auto"), None


def _prepare_folder(tmp_path, weights, monkeypatch) -> None:
    """What the commands refer to, relative to where they run: recipes/, a DeepSpeed JSON, the 224
    checkpoint the 512 recipe starts from, an exported OUT.pt."""
    from d4d.modules.dynamic import DynamicVideoModule
    from d4d.modules.fourdgen import FourDGenModule

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    (tmp_path / "my_config.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    ckpt = tmp_path / "runs" / "4dgen_224_linear" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    src = FourDGenModule(encoder=str(weights / "dinov2"), dec_dim=32, dec_depth=2, dec_heads=2, head="linear")
    state = {"state_dict": src.state_dict()}
    src.on_save_checkpoint(state)
    torch.save(state, ckpt)
    dyn = DynamicVideoModule(backbone=str(weights / "wan"), camera_hidden=16)
    torch.save({"state_dict": {k: v for k, v in dyn.state_dict().items() if k.startswith("model.camera.")}},
               tmp_path / "OUT.pt")


@pytest.mark.parametrize("source,args", COMMANDS, ids=[re.sub(r"\s+", " ", c)[:90] for c, _ in COMMANDS])
def test_documented_fit_command_builds_as_written(source, args, weights, tmp_path, monkeypatch):
    _prepare_folder(tmp_path, weights, monkeypatch)
    if "--print_config" in args:  # prints the resolved recipe and exits 0
        from tests.conftest import run_module

        proc = run_module("d4d.fit", *args, cwd=tmp_path, timeout=120)
        assert "class_path: d4d.modules.classifier.MotionClassifierModule" in proc.stdout
        return
    recipe = args[0]
    cli = build_cli(recipe, args[1:] + offline(recipe, weights))
    kind, stage = expected_strategy(recipe, args)
    strategy = cli.trainer.strategy
    if kind == "deepspeed":
        assert isinstance(strategy, AtomicDeepSpeedStrategy), (source, type(strategy))
        assert strategy.config["zero_optimization"]["stage"] == stage
    elif kind == "ddp":
        assert isinstance(strategy, DDPStrategy) and not isinstance(strategy, AtomicDeepSpeedStrategy), type(strategy)
    else:
        assert not isinstance(strategy, AtomicDeepSpeedStrategy)
    cli.model.configure_model()  # init_from and activation checkpointing, as Lightning calls it
    wanted = (yaml.safe_load((REPO / recipe).read_text()).get("activation_checkpointing")
              or ("--activation_checkpointing" in args))
    assert (count_checkpointed(cli.model) > 0) == bool(wanted), source


@pytest.mark.parametrize("strategy,preset", [("deepspeed_stage_1", "zero1"), ("deepspeed_stage_3", "zero3"),
                                             ("deepspeed_stage_2_offload", "config JSON")])
def test_lightning_deepspeed_names_are_refused_with_the_preset(strategy, preset, tmp_path, monkeypatch):
    from d4d.utils.errors import UserError

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(UserError, match=f"trainer.strategy: '{strategy}'.*--deepspeed.*{preset}"):
        build_cli(str(REPO / "recipes/debug/4dgen_224_linear.yaml"),
                  ["--trainer.strategy", strategy, "--run_dir", str(tmp_path / "run")])


def test_deepspeed_and_strategy_from_one_place_conflict(tmp_path, monkeypatch):
    from d4d.utils.errors import UserError

    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(UserError, match="conflicts with trainer.strategy"):
        build_cli(str(REPO / "recipes/debug/4dgen_224_linear.yaml"),
                  ["--trainer.strategy", "ddp", "--deepspeed", "zero2", "--run_dir", str(tmp_path / "run")])
    cli = build_cli(str(REPO / "recipes/debug/4dgen_224_linear.yaml"),
                    ["--deepspeed", "none", "--run_dir", str(tmp_path / "run")])
    assert not isinstance(cli.trainer.strategy, AtomicDeepSpeedStrategy)
