"""Build a recipe's LightningModule without weights and run its training computation on any device.

Used by :mod:`benchmarks.memory_plan`. :func:`build_stage` reads ``recipes/*.yaml``, swaps each
pretrained hub id for the published config of that network (:mod:`d4d.models.published`) so the
module builds offline, and builds it under ``torch.device(device)`` (``"meta"``: no memory at all).
A :class:`Stage` then makes the inputs of one training micro-batch at the recipe's size and runs

* ``encode``: the frozen encoders of the step under ``no_grad`` (VAE, text / image encoders), and
* ``forward``: the trained network on their outputs, returning a scalar to call ``backward`` on.

The network is the module's own (``DynamicWan``, ``MultiViewUNet``, ``ReconstructionNet``,
``MotionClassifier``); the losses around it are left out (a sum of the outputs stands in: it saves
nothing for backward), and so are steps meta tensors cannot run (boolean indexing of given views,
epipolar masks from cameras: an all-true ``(B, L, L)`` mask of the right size is used).
"""
from __future__ import annotations

import dataclasses
import importlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from d4d.models.published import PUBLISHED

REPO = Path(__file__).resolve().parents[1]
CALLABLE_ARGS = ("optimizer", "scheduler", "lr_scheduler")


class AssumeTrue(torch.Tensor):
    """A tensor whose truth value (and that of its ``any()``) is True, for the camera ``keep`` flags:
    a host-side ``bool(keep.any())`` (skip the branches when every clip dropped its camera) cannot
    be answered by a meta tensor."""

    def __bool__(self) -> bool:
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return out.as_subclass(cls) if func in (torch.Tensor.any, torch.any) else out


@dataclasses.dataclass
class Stage:
    name: str
    recipe: dict[str, Any]
    module: nn.Module
    inputs: Callable[[], dict[str, Any]]  # raw micro-batch (B = data.batch_size)
    encode: Callable[[dict[str, Any]], dict[str, Any]]  # frozen encoders, no_grad
    forward: Callable[[dict[str, Any]], Any]  # trained network -> outputs
    batch: int  # samples in the micro-batch
    from_checkpoint: set[int]  # ids of parameters read from a pretrained checkpoint
    checkpoint_on_gpu: bool  # those are read straight onto the GPU (no host copy)
    size: tuple[int, int] | None = None  # (H, W) the inputs are made at


def read_recipe(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def _offline_args(cls_name: str, args: dict[str, Any]) -> tuple[dict[str, Any], list]:
    """Replace hub ids by their published configs; returns the arguments and patches to apply."""
    args, patches = dict(args), []
    if cls_name == "MotionClassifierModule" and isinstance(args.get("backbone"), str):
        published = PUBLISHED[args["backbone"]]["backbone"]
        args["resnet_overrides"] = {**published, **(args.get("resnet_overrides") or {})}
        args["backbone"] = None
    elif cls_name == "StaticVideoModule":
        for key in ("unet", "vae", "image_encoder"):
            if isinstance(args.get(key), str):
                args[key] = dict(PUBLISHED[args[key]][key])
                args[f"{key}_subfolder"] = None
    elif cls_name == "FourDGenModule":
        if isinstance(args.get("encoder"), str):
            args["encoder_config"] = {"type": "dinov2", **PUBLISHED[args["encoder"]]["encoder"]}
            args["encoder"] = None
        args["init_from"] = None  # weights only: the shapes are the recipe's
    elif cls_name == "DynamicVideoModule" and isinstance(args.get("backbone"), str):
        from d4d.models.dynamic.backbone import build_published_wan

        if args["backbone"] not in PUBLISHED:
            raise KeyError(f"no published config for {args['backbone']!r} (d4d/models/published.py)")
        # the module reads its backbone with load_wan(source, dtype, device); stand in for it
        patches.append(mock.patch("d4d.modules.dynamic.load_wan",
                                  lambda source, dtype=torch.float32, *a, **k: build_published_wan(dtype, "meta")))
    return args, patches


def build_module(recipe: dict[str, Any], device: str | torch.device = "meta", seed: int = 0) -> nn.Module:
    """The recipe's LightningModule, pretrained parts from published configs, built on ``device``."""
    path, _, cls_name = recipe["model"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(path), cls_name)
    args = {k: v for k, v in (recipe["model"].get("init_args") or {}).items() if k not in CALLABLE_ARGS}
    args, patches = _offline_args(cls_name, args)
    torch.manual_seed(seed)
    with ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(torch.device(device))
        module = cls(**args)
    if torch.device(device).type == "meta" and any(p.device.type != "meta" for p in module.parameters()):
        raise RuntimeError(f"{cls_name}: some parameters were not built on the meta device")
    return module.to(device)


def _cameras(b: int, f: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``c2w (B, F, 4, 4)``: a sideways dolly; ``K (B, 3, 3)``."""
    c2w = torch.eye(4, device=device).repeat(b, f, 1, 1)
    c2w[..., 0, 3] = torch.linspace(0, 0.5, f, device=device)
    K = torch.tensor([[0.8 * w, 0, w / 2], [0, 0.8 * w, h / 2], [0, 0, 1.0]], device=device)
    return c2w, K.expand(b, 3, 3).clone()


def build_stage(recipe_path: str | Path, device: str | torch.device = "meta", size: tuple[int, int] | None = None,
                frozen_dtype: str | None = None) -> Stage:
    """:class:`Stage` of a recipe on ``device``; ``size`` picks one of several ``image_sizes``
    (default: the largest); ``frozen_dtype`` overrides the dynamic stage's ``model.frozen_dtype``."""
    recipe = read_recipe(recipe_path)
    if frozen_dtype is not None and recipe["model"]["class_path"].endswith("DynamicVideoModule"):
        recipe["model"]["init_args"]["frozen_dtype"] = frozen_dtype
    module = build_module(recipe, device)
    data = recipe["data"]["init_args"]
    kind = type(module).__name__
    dev = torch.device(device)
    name = Path(recipe_path).stem
    make = {"MotionClassifierModule": _classifier, "StaticVideoModule": _static, "DynamicVideoModule": _dynamic,
            "FourDGenModule": _fourdgen}[kind]
    return make(name, recipe, module, data, dev, tuple(size) if size else None)


def _classifier(name, recipe, module, data, dev, size):
    s = int(data.get("image_size", 224))
    n = int(data.get("n_way", 8)) * (int(data.get("k_shot", 5)) + int(data.get("n_query", 4)))  # one episode
    trunk = {id(p) for p in module.model.trunk.parameters()}
    return Stage(name, recipe, module, lambda: {"images": torch.rand(n, 3, s, s, device=dev)},
                 lambda x: x, lambda x: module.model(x["images"].to(module.model.head.weight.dtype)),
                 n, trunk if recipe["model"]["init_args"].get("backbone") else set(), False, (s, s))


def _static(name, recipe, module, data, dev, size):
    hw = tuple(size or data["image_size"])
    b, v = int(data.get("batch_size", 1)), int(data["num_frames"])
    given_n = min(int(module.hparams.num_given[1]), v - 1)  # the most views CLIP encodes

    def inputs():  # cameras enter as a Plücker map of the right shape (made in encode)
        return {"frames": torch.rand(b, v, 3, *hw, device=dev)}

    def encode(x):
        frames = x["frames"]
        latents = module.vae.encode(frames.flatten(0, 1))
        latents = latents.reshape(b, v, *latents.shape[1:])
        enc = module.image_encoder  # FrozenImageEncoder.forward without its boolean view selection
        with torch.no_grad():
            sel = frames[:, :given_n].flatten(0, 1)
            pix = F.interpolate(sel.float(), size=(enc.size, enc.size), mode="bicubic", align_corners=False)
            pix = ((pix.clamp(0, 1) - enc.mean) / enc.std).to(next(enc.encoder.parameters()).dtype)
            emb = enc.encoder(pixel_values=pix).image_embeds.float().view(b, given_n, -1).mean(1)
        context = enc.proj(emb.to(next(iter(enc.proj.parameters()), emb).dtype))[:, None]
        given = torch.zeros(b, v, dtype=torch.bool, device=dev)
        given[:, :given_n] = True
        plucker = torch.rand(b, v, 6, *latents.shape[-2:], device=dev)
        t = torch.full((b,), 500, dtype=torch.long, device=dev)
        return {"latents": latents, "given": given, "plucker": plucker, "context": context, "t": t}

    from_ckpt = set()
    if isinstance(recipe["model"]["init_args"].get("unet"), str):
        from_ckpt = {id(p) for m in (module.unet, module.vae, module.image_encoder.encoder) for p in m.parameters()}
    return Stage(name, recipe, module, inputs, encode,
                 lambda x: module.unet(x["latents"], x["t"], x["given"], x["plucker"], x["context"]),
                 b, from_ckpt, False, hw)


def _dynamic(name, recipe, module, data, dev, size):
    from d4d.models.dynamic.backbone import WAN_TEXT_TOKENS
    from d4d.models.dynamic.camera import plucker_tokens, relative_scaled_poses

    hw = tuple(size or data["image_size"])
    b, f = int(data.get("batch_size", 1)), int(data["num_frames"])
    m = module.model

    def inputs():
        c2w, K = _cameras(b, f, *hw, dev)
        return {"frames": torch.rand(b, f, 3, *hw, device=dev), "c2w": c2w, "K": K}

    def encode(x):
        frames = x["frames"]
        x0 = m.encode_video(frames)
        cond = m.image_condition(frames[:, 0], f)
        with torch.no_grad():  # DynamicWan.encode_text without the padding mask (meta cannot test it)
            ids = m.tokenizer(["a camera moves"] * b, padding="max_length", max_length=WAN_TEXT_TOKENS,
                              truncation=True, return_tensors="pt").input_ids.to(dev, copy=True)
            text = m.text_encoder(ids).last_hidden_state
        image = m.encode_image(frames[:, 0])
        with torch.no_grad():
            camera = plucker_tokens(relative_scaled_poses(x["c2w"].double()).float(), x["K"], hw, m.token_px,
                                    m.temporal_factor)
        length = x0.shape[2] * (x0.shape[3] // m.patch) * (x0.shape[4] // m.patch)
        mask = torch.ones(b, length, length, dtype=torch.bool, device=dev) if m.epipolar_blocks else None
        keep = torch.ones(b, device=dev).as_subclass(AssumeTrue)
        t = torch.full((b,), 500.0, device=dev)
        return {"noisy": torch.randn_like(x0), "t": t, "cond": cond, "text": text, "image": image,
                "camera": camera, "mask": mask, "keep": keep}

    parts = (m.transformer, m.vae, m.text_encoder, m.image_encoder)
    backbone = recipe["model"]["init_args"].get("backbone")
    from_ckpt = {id(p) for part in parts for p in part.parameters()} if backbone else set()
    on_gpu = bool(backbone) and str(recipe["model"]["init_args"].get("load_device", "auto")) != "cpu"
    def forward(x):
        return m(x["noisy"], x["t"], x["cond"], x["text"], x["image"], x["camera"], x["mask"], x["keep"])

    return Stage(name, recipe, module, inputs, encode, forward, b, from_ckpt, on_gpu, hw)


def _fourdgen(name, recipe, module, data, dev, size):
    sizes = [tuple(s) for s in data.get("image_sizes", [[224, 224]])]
    hw = tuple(size or max(sizes, key=lambda s: s[0] * s[1]))
    b, f = int(data.get("batch_size", 1)), int(data.get("num_frames", 4))

    def inputs():
        c2w, K = _cameras(b, f, *hw, dev)
        return {"frames": torch.rand(b, f, 3, *hw, device=dev), "c2w": c2w, "K": K}

    def forward(x):
        dtype = module.net.enc_proj.weight.dtype
        return module.net(x["frames"].to(dtype), x["c2w"], x["K"])

    enc = {id(p) for p in module.net.encoder.parameters()} if recipe["model"]["init_args"].get("encoder") else set()
    return Stage(name, recipe, module, inputs, lambda x: x, forward, b, enc, False, hw)


def image_sizes(recipe: dict[str, Any]) -> list[tuple[int, int]]:
    """The input sizes a recipe trains at (several for the 4D generator's 512 stage, one per batch)."""
    data = recipe["data"]["init_args"]
    if "image_sizes" in data:
        return [tuple(s) for s in data["image_sizes"]]
    s = data.get("image_size", 224)
    return [tuple(s) if isinstance(s, (list, tuple)) else (int(s), int(s))]


def loss_of(outputs) -> torch.Tensor:
    """The stand-in loss: the sum of the network's outputs that require grad (it saves nothing)."""
    leaves = outputs.values() if isinstance(outputs, dict) else (
        outputs if isinstance(outputs, (list, tuple)) else [outputs])
    return sum(t.float().sum() for t in leaves if torch.is_tensor(t) and t.requires_grad)
