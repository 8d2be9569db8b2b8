"""LightningModule of the 4D generator's reconstruction network (paper Table 3, ``reference.md`` section 7).

Progressive training: ``recipes/4dgen_224_linear.yaml`` (linear head), then
``recipes/4dgen_512_dpt.yaml`` with ``init_from`` the 224 checkpoint: encoder, pose/time embeddings
and decoder carry over, the DPT head starts new. ``init_from`` only loads weights (a new run: new
optimizer, schedule and epoch count); resuming an interrupted run is Lightning's ``--ckpt_path``.

Supervision: the shard's depth where it has one (synthetic ``depth.npy``); otherwise the
temporal-structure initialisation's aligned depth (:func:`d4d.fourd.init.initialise` with the
Depth Anything model of ``init_depth``), computed on the fly. Schedule: AdamW (0.9, 0.95), wd 0.05,
lr from the optimizer (1e-5) to ``final_lr`` (1e-6) by half a cosine after ``warmup_epochs`` (0.5)
of linear warm-up, stepped per optimizer step. Checkpoints carry ``d4d_stage: "4dgen"`` and the
network config (:func:`load_network`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from d4d.fourd.callbacks import WarmupHalfCosine
from d4d.fourd.heads import drop_dead_head_keys
from d4d.fourd.losses import depth_metrics, gt_points, point_error, reconstruction_loss
from d4d.fourd.network import ReconstructionNet
from d4d.utils.checkpoints import read_checkpoint
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)
STAGE = "4dgen"
NET_KEYS = ("encoder", "encoder_config", "dec_dim", "dec_depth", "dec_heads", "head", "head_args")


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.05)


class FourDGenModule(L.LightningModule):
    """Trains :class:`~d4d.fourd.network.ReconstructionNet`.

    Args:
        encoder / encoder_config / dec_dim / dec_depth / dec_heads / head / head_args: the network
            (:class:`ReconstructionNet`); ``encoder`` is a transformers directory or hub id.
        init_from: a 4dgen checkpoint whose weights (all but ``head.*``) start this run.
        alpha, metric_scale, pose_weight, rgb_weight: loss (:func:`d4d.fourd.losses.reconstruction_loss`).
        init_depth / init_depth_config: Depth Anything V2 (id/dir, or tiny random config) that
            supervises clips without depth. flow: ``dis`` or ``raft``.
        warmup_epochs, final_lr: the schedule. val_plots: point-cloud pictures per validation.
        plot_dir: default ``<run_dir>/plots``.
        scene_optimisation: defaults for the per-scene 4D optimisation of scenes reconstructed with
            this checkpoint (fields of :class:`d4d.fourd.optimise.OptimConfig`, e.g.
            ``{pose_steps: 10, steps: 30}``); saved in ``hparams``. Consumers (``d4d.generate``,
            ``d4d.evaluate``, :func:`scene_optimisation_config`) use: explicit CLI flag, else this,
            else the ``OptimConfig`` defaults.
    """

    stage = STAGE

    def __init__(self, encoder: str | None = None, encoder_config: dict[str, Any] | None = None,
                 dec_dim: int = 768, dec_depth: int = 12, dec_heads: int = 12, head: str = "linear",
                 head_args: dict[str, Any] | None = None, init_from: str | None = None,
                 alpha: float = 0.2, metric_scale: bool = True, pose_weight: float = 0.1, rgb_weight: float = 0.0,
                 init_depth: str | None = None, init_depth_config: dict[str, Any] | None = None, flow: str = "dis",
                 warmup_epochs: float = 0.5, final_lr: float = 1e-6,
                 val_plots: int = 1, plot_dir: str | None = None, optimizer: OptimizerCallable = _adamw,
                 scene_optimisation: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        validate_scene_optimisation(scene_optimisation, "model.scene_optimisation")
        if head not in ("linear", "dpt"):
            raise UserError(f"model.head must be 'linear' or 'dpt', got {head!r}")
        if alpha <= 0:
            raise UserError(f"model.alpha must be > 0, got {alpha}")
        try:
            self.net = ReconstructionNet(encoder, encoder_config, dec_dim, dec_depth, dec_heads, head, head_args)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"model.encoder: cannot build {encoder or encoder_config!r}: {str(exc).splitlines()[0]}") from None
        if init_from:
            self._init_from(init_from)
        self.optimizer_factory = optimizer
        # Frozen helpers live outside the module tree: not in state_dict (a checkpoint of a run that
        # built one still loads into a fresh module), not cast or sharded by DeepSpeed.
        self._helpers: dict[str, torch.nn.Module] = {}

    # ------------------------------------------------------------------------------- weights
    def _init_from(self, path: str) -> None:
        try:
            ckpt = read_checkpoint(path)
        except UserError as exc:
            raise UserError(f"model.init_from: {exc}") from None
        if ckpt.get("d4d_stage") != STAGE:
            raise UserError(f"model.init_from: {path} is not a 4dgen checkpoint (d4d_stage != '4dgen')")
        body = {k[len("net."):]: v for k, v in ckpt["state_dict"].items()
                if k.startswith("net.") and not k.startswith("net.head.")}
        own = self.net.state_dict()
        bad = [k for k, v in body.items() if k in own and own[k].shape != v.shape]
        if bad:
            raise UserError(f"model.init_from: {path} has a different network shape ({bad[0]}: "
                            f"{tuple(body[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
        missing, unexpected = self.net.load_state_dict(body, strict=False)
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            raise UserError(f"model.init_from: {path} does not match the network (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
        log.info("init_from %s: %d tensors loaded, head %r starts new", path, len(body), self.hparams.head)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["d4d_stage"] = STAGE
        checkpoint["d4d_4dgen"] = {k: self.hparams[k] for k in NET_KEYS}
        checkpoint["d4d_4dgen"]["encoder_config"] = self.net.encoder.config.to_dict()
        checkpoint["d4d_4dgen"]["encoder_type"] = self.net.encoder.config.model_type

    # ---------------------------------------------------------------------------- supervision
    def depth_model(self):
        """The frozen Depth Anything model that supervises clips without depth (built on first use, fp32,
        kept out of ``state_dict``)."""
        model = self._helpers.get("depth")
        if model is None:
            from d4d.fourd.init import DepthEstimator

            h = self.hparams
            if not h.init_depth and h.init_depth_config is None:
                raise UserError("a batch has clips without depth: set model.init_depth (Depth Anything V2) "
                                "so the initialisation can supervise them")
            model = self._helpers["depth"] = DepthEstimator(h.init_depth, h.init_depth_config).eval()
        return model.to(self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # checkpoints written while the depth model was a submodule carry its weights: not ours to load
        # and DPT heads written before their coarsest fusion block lost its never-used skip unit
        state = checkpoint.get("state_dict") or {}
        kept = drop_dead_head_keys(state, "net.")
        for key in [k for k in state if k.startswith("_depth_model.") or k not in kept]:
            del state[key]

    def supervision(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Depth ``(B, F, H, W)`` and metric flags: the shard's, or the initialisation's."""
        depth, metric = batch["depth"].clone(), batch["metric"].clone()
        missing = ~batch["has_depth"].bool()
        if missing.any():
            from d4d.fourd.init import initialise

            for i in torch.nonzero(missing).flatten().tolist():
                res = initialise(batch["frames"][i].float(), batch["c2w"][i], batch["K"][i], self.depth_model(),
                                 self.hparams.flow)
                depth[i] = res.depth.to(depth)
                metric[i] = False
        return depth, metric

    # ------------------------------------------------------------------------------- training
    def forward(self, frames, c2w, K, times=None):
        return self.net(frames, c2w, K, times)

    def _loss(self, batch, pred=None):
        depth, metric = self.supervision(batch)
        pred = pred if pred is not None else self(batch["frames"], batch["c2w"], batch["K"])
        h = self.hparams
        parts = reconstruction_loss(pred, depth, batch["K"], batch["c2w"], metric, batch["frames"], h.alpha,
                                    h.metric_scale, h.pose_weight, h.rgb_weight)
        return parts, pred, depth

    def training_step(self, batch, batch_idx: int):
        parts, _, _ = self._loss(batch)
        b = batch["frames"].shape[0]
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=b, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items() if k != "loss"}, batch_size=b)
        return parts["loss"]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        base = optimizer.param_groups[0]["lr"]
        # The schedule's length is set in on_train_start: trainer.estimated_stepping_batches here
        # would build the training loader before a checkpoint is restored, and Lightning would then
        # never restore the loader's position (Lightning issue #20550).
        schedule = WarmupHalfCosine(base, min(self.hparams.final_lr, base), self.hparams.warmup_epochs)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        total = self.trainer.estimated_stepping_batches  # the loader exists (and is restored) by now
        if not math.isfinite(total):
            raise UserError("the learning-rate schedule needs the epoch length: set data.epoch_length "
                            "(or trainer.max_steps)")
        epochs = self.trainer.max_epochs or 1
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            for group, base, schedule in zip(sched.optimizer.param_groups, getattr(sched, "base_lrs", []),
                                             getattr(sched, "lr_lambdas", [])):
                if isinstance(schedule, WarmupHalfCosine):
                    schedule.set_length(total, epochs)
                    # the learning rate of the step about to run (after a resume: of the restored step)
                    group["lr"] = base * schedule(sched.last_epoch)

    # ----------------------------------------------------------------------------- evaluation
    def _eval(self, stage: str, batch, batch_idx: int) -> None:
        parts, pred, depth = self._loss(batch)
        b = batch["frames"].shape[0]
        local, world, valid = gt_points(depth, batch["K"], batch["c2w"])
        dm = depth_metrics(pred["local"][..., 2], depth, valid)
        perr = point_error(pred["world"], world, valid)
        self.log(f"{stage}/loss", parts["loss"], prog_bar=True, batch_size=b, sync_dist=True)
        self.log(f"{stage}/abs_rel", dm["abs_rel"].nanmean(), prog_bar=True, batch_size=b, sync_dist=True)
        self.log(f"{stage}/delta1", dm["delta1"].nanmean(), batch_size=b, sync_dist=True)
        self.log(f"{stage}/point_err", perr.nanmean(), batch_size=b, sync_dist=True)
        if batch_idx < self.hparams.val_plots and not self.trainer.sanity_checking and self.trainer.is_global_zero:
            self._plot(stage, batch, pred, batch_idx)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval("test", batch, batch_idx)

    def _plot(self, stage: str, batch, pred, index: int) -> None:
        from d4d.fourd.viz import point_cloud_figure, save_figure

        frames = batch["frames"][0]
        h, w = frames.shape[-2:]
        pts = pred["world"][0].reshape(-1, 3)
        cols = frames.permute(0, 2, 3, 1).reshape(-1, 3)
        fig = point_cloud_figure(pts, cols, batch["K"][0, 0], h, w, frames, title=f"{stage} epoch {self.current_epoch}")
        plot_dir = Path(self.hparams.plot_dir or os.path.join(self.trainer.default_root_dir, "plots"))
        path = save_figure(fig, plot_dir / f"{stage}_points_epoch{self.current_epoch:03d}_{index}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"{stage}/point_cloud", images=[str(path)], step=self.global_step)


def validate_scene_optimisation(values: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """Check ``values`` against :class:`d4d.fourd.optimise.OptimConfig` (unknown key or a value of the
    wrong type -> :class:`UserError` naming ``where`` and the key); returns a plain dict."""
    import dataclasses

    from d4d.fourd.optimise import OptimConfig

    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of OptimConfig fields, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(OptimConfig)}
    out = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"{where}: unknown key {key!r} (OptimConfig fields: {', '.join(fields)})")
        kind = type(fields[key].default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
            raise UserError(f"{where}.{key} must be a {kind.__name__}, got {value!r}")
        if value < 0:
            raise UserError(f"{where}.{key} must be >= 0, got {value!r}")
        out[key] = kind(value)
    return out


def resolve_scene_optimisation(flags: dict[str, Any], stored: dict[str, Any] | None,
                               where: str = "scene_optimisation"):
    """The one rule for consumers of a 4dgen checkpoint: each :class:`~d4d.fourd.optimise.OptimConfig`
    field from ``flags`` (explicit CLI values; ``None`` = not given), else ``stored`` (the checkpoint's
    ``scene_optimisation``; old checkpoints: ``{}``/None), else the default. Returns
    ``(OptimConfig, {field: "flag" | "checkpoint" | "default"})``; bad keys/values -> :class:`UserError`."""
    import dataclasses

    from d4d.fourd.optimise import OptimConfig

    stored = validate_scene_optimisation(stored or {}, where)
    given = validate_scene_optimisation({k: v for k, v in flags.items() if v is not None}, "scene optimisation flags")
    sources = {f.name: "flag" if f.name in given else "checkpoint" if f.name in stored else "default"
               for f in dataclasses.fields(OptimConfig)}
    return OptimConfig(**{**stored, **given}), sources


def scene_optimisation_config(hparams: dict[str, Any] | None = None, **overrides: Any):
    """:func:`resolve_scene_optimisation` from a checkpoint's ``hparams`` (or ``load_network`` meta)
    and keyword overrides; returns the :class:`~d4d.fourd.optimise.OptimConfig` alone."""
    return resolve_scene_optimisation(overrides, (hparams or {}).get("scene_optimisation"))[0]


def load_network(checkpoint_path: str | os.PathLike) -> tuple[ReconstructionNet, dict[str, Any]]:
    """Rebuild the trained :class:`ReconstructionNet` (eval mode) from a 4dgen checkpoint, with no
    download (the encoder is rebuilt from its stored config). ``meta``: the network config plus
    ``scene_optimisation`` (the module's hparam, ``{}`` for checkpoints written before it existed)."""
    path = Path(checkpoint_path)
    ckpt = read_checkpoint(path)
    if ckpt.get("d4d_stage") != STAGE:
        raise UserError(f"{path} is not a 4dgen checkpoint (d4d_stage != '4dgen')")
    meta = dict(ckpt["d4d_4dgen"])
    meta["scene_optimisation"] = dict((ckpt.get("hyper_parameters") or {}).get("scene_optimisation") or {})
    enc_cfg = {k: v for k, v in meta["encoder_config"].items()
               if k not in ("model_type", "transformers_version", "architectures", "_name_or_path")}
    enc_cfg["type"] = "dinov2" if meta.get("encoder_type") == "dinov2" else "vit"
    net = ReconstructionNet(None, enc_cfg, meta["dec_dim"], meta["dec_depth"], meta["dec_heads"], meta["head"],
                            meta["head_args"])
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    state = {k.replace("._checkpoint_wrapped_module", ""): v for k, v in state.items()}
    net.load_state_dict(drop_dead_head_keys(state))
    return net.eval(), meta
