"""LightningModule of the static video module: multi-view diffusion after SEVA (reference.md
section 5; paper "Static Module", Table 3: 80 frames, CFG 4 within [1, 7]).

Training (one clip window of ``V`` views): a random subset of ``num_given`` views is given clean,
the rest are noised with diffusers' ``DDPMScheduler`` and predicted with the **v-prediction**
objective of Stable Diffusion 2.1, the backbone we inflate. Keeping the base model's objective and
noise schedule keeps its pretrained prior usable from step 0 (an EDM re-parameterisation would
first have to be re-learned); sampling uses ``EulerDiscreteScheduler`` on the same schedule
(50 Euler steps). Poses are relative to the first given view and normalised as SEVA
(:func:`~d4d.models.static.conditioning.normalize_poses`, ``camera_scale`` 2.0). The loss is the
MSE on the target views only. With probability ``p_uncond`` the CLIP token is zeroed (the
unconditional branch of classifier-free guidance).

Checkpoints carry ``d4d_stage: "static"`` and the configs needed by :meth:`StaticVideoModule.from_checkpoint`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from d4d.geometry.cameras import resize_intrinsics
from d4d.models.static.conditioning import (FrozenImageEncoder, FrozenVAE, first_given_index, latent_plucker,
                                            load_image_encoder, load_vae, normalize_poses)
from d4d.models.static.consistency import reprojection_error
from d4d.models.static.sampling import check_guidance, plan_chunks, sample_window, view_guidance_scales
from d4d.models.static.unet import MultiViewUNet, load_unet
from d4d.utils.checkpoints import read_checkpoint
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger
from d4d.video.interface import CameraPath, ProgressFn, VideoRequest, VideoResult

STAGE = "static"
META_KEY = "d4d_static"
log = get_logger(__name__)

SD21_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "steps_offset": 1}


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


def _config_dict(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


class StaticVideoModule(L.LightningModule):
    """Multi-view diffusion (static scenes); implements :class:`d4d.video.interface.VideoGenerator`.

    Args:
        unet: ``UNet2DConditionModel`` directory / hub id (``stabilityai/stable-diffusion-2-1``
            with ``unet_subfolder: unet``) or a config dict (random weights, tests/debug).
        vae: ``AutoencoderKL`` directory / hub id / config dict, or null for pixel space.
        image_encoder: ``CLIPVisionModelWithProjection`` directory / hub id / ``CLIPVisionConfig`` dict.
        attention_3d: transformer blocks with 3D attention (dotted-name globs, see :class:`MultiViewUNet`).
        view_attention: 1D view-axis attention in every transformer block. plucker_film: FiLM in ResBlocks.
        scheduler_config: ``DDPMScheduler`` config (default SD 2.1's, v-prediction).
        camera_scale: SEVA's pose normalisation (2.0). num_given: ``[min, max]`` given views per window.
        p_uncond: probability of dropping the CLIP token (CFG training).
        image_size: ``[H, W]`` the model generates at (the training resolution).
        sample_window: views per sampling window (the training ``num_frames``), num_steps (50),
            cfg (4.0), cfg_min (lower scale near given cameras): sampling defaults.
        val_sample_steps / val_renders: Euler steps and number of validation windows rendered as videos.
        plot_dir: where validation videos go (default ``<run_dir>/plots``).
    """

    stage = STAGE

    def __init__(self, unet: str | dict[str, Any], image_encoder: str | dict[str, Any],
                 vae: str | dict[str, Any] | None = None, unet_subfolder: str | None = None,
                 vae_subfolder: str | None = None, image_encoder_subfolder: str | None = None,
                 attention_3d: list[str] | None = None, view_attention: bool = True, plucker_film: bool = True,
                 scheduler_config: dict[str, Any] | None = None, camera_scale: float = 2.0,
                 num_given: tuple[int, int] = (1, 3), p_uncond: float = 0.1,
                 image_size: tuple[int, int] = (576, 576), sample_window: int = 21, num_steps: int = 50,
                 cfg: float = 4.0, cfg_min: float = 1.2,
                 val_sample_steps: int = 50, val_renders: int = 1, plot_dir: str | None = None,
                 optimizer: OptimizerCallable = _adamw, lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        check_guidance({"cfg": cfg, "cfg_min": cfg_min}, cfg, cfg_min)
        if not (1 <= num_given[0] <= num_given[1]):
            raise UserError(f"model.num_given must be [min, max] with 1 <= min <= max, got {list(num_given)}")
        if not 0 <= p_uncond < 1:
            raise UserError(f"model.p_uncond must be in [0, 1), got {p_uncond}")
        from diffusers import DDPMScheduler

        base = load_unet(unet, unet_subfolder)
        self._unet_config = _config_dict(base.config)
        self.vae = FrozenVAE(load_vae(vae, vae_subfolder))
        if base.config.in_channels != self.vae.channels:
            raise UserError(f"model.unet takes {base.config.in_channels} input channels but the "
                            f"{'VAE' if vae is not None else 'pixel space (vae: null)'} gives {self.vae.channels}")
        self.unet = MultiViewUNet(base, attention_3d if attention_3d is not None else ["*"],
                                  view_attention=view_attention, plucker_film=plucker_film)
        encoder = load_image_encoder(image_encoder, image_encoder_subfolder)
        self.image_encoder = FrozenImageEncoder(encoder, int(base.config.cross_attention_dim))
        self.noise_scheduler = DDPMScheduler.from_config({**SD21_SCHEDULER, **(scheduler_config or {})})
        if self.noise_scheduler.config.prediction_type not in ("v_prediction", "epsilon"):
            raise UserError("model.scheduler_config.prediction_type must be v_prediction or epsilon")
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    @property
    def training_data(self) -> dict[str, Any]:
        """Defaults of ``d4d.sample_video``: Dream4D's 80 frames at the training resolution."""
        return {"num_frames": 80, "image_size": [int(s) for s in self.hparams.image_size]}

    # -------------------------------------------------------------------------------- helpers
    def _given_mask(self, b: int, v: int, generator: torch.Generator | None = None) -> torch.Tensor:
        lo, hi = self.hparams.num_given
        hi = min(hi, v - 1)
        lo = min(lo, hi)
        n = torch.randint(lo, hi + 1, (b, 1), generator=generator)
        rank = torch.rand(b, v, generator=generator).argsort(-1).argsort(-1)
        return (rank < n).to(self.device)

    def condition(self, frames: torch.Tensor, c2w: torch.Tensor, Ks: torch.Tensor, given: torch.Tensor):
        """Latents ``(B, V, C, h, w)``, Plücker ``(B, V, 6, h, w)`` and CLIP token ``(B, 1, D)`` of a window.

        frames: ``(B, V, 3, H, W)`` [0, 1]; c2w: ``(B, V, 4, 4)`` OpenCV; Ks: ``(B, V, 3, 3)`` pixel K
        at ``(H, W)``; given: ``(B, V)`` bool.
        """
        b, v, _, height, width = frames.shape
        latents = self.vae.encode(frames.flatten(0, 1))
        latents = latents.reshape(b, v, *latents.shape[1:])
        poses = normalize_poses(c2w.double(), first_given_index(given), self.hparams.camera_scale)
        plucker = latent_plucker(poses, Ks, (height, width), tuple(latents.shape[-2:]))
        return latents, plucker, self.image_encoder(frames, given)

    def _target(self, latents, noise, t):
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, t)
        return noise

    def diffusion_loss(self, batch: dict[str, Any], given: torch.Tensor, generator: torch.Generator | None = None,
                       drop_context: bool = True) -> torch.Tensor:
        """Mean squared error of the prediction on the target views of a batch (module docstring)."""
        frames = batch["frames"]
        b, v = frames.shape[:2]
        latents, plucker, context = self.condition(frames, batch["c2w"], batch["Ks"], given)
        if drop_context and self.hparams.p_uncond > 0:
            keep = torch.rand(b, 1, 1, generator=generator).to(self.device) >= self.hparams.p_uncond
            context = context * keep
        n_train = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, n_train, (b,), generator=generator).to(self.device)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        flat_t = t.repeat_interleave(v)
        noisy = self.noise_scheduler.add_noise(latents.flatten(0, 1), noise.flatten(0, 1), flat_t).view_as(latents)
        g = given[:, :, None, None, None]
        x_in = torch.where(g, latents, noisy)
        pred = self.unet(x_in, t, given, plucker, context).float()
        target = self._target(latents.flatten(0, 1), noise.flatten(0, 1), flat_t).view_as(latents)
        per_view = (pred - target).square().mean((2, 3, 4))
        targets = (~given).float()
        return (per_view * targets).sum() / targets.sum().clamp_min(1)

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        b, v = batch["frames"].shape[:2]
        if v < 2:
            raise UserError(f"data.num_frames must be >= 2 for the static module (one given, one target), got {v}")
        given = self._given_mask(b, v)
        loss = self.diffusion_loss(batch, given)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/num_given", given.float().sum(1).mean(), batch_size=b)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler_factory(optimizer),
                                                         "interval": "step"}}

    # ----------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        b, v = batch["frames"].shape[:2]
        gen = torch.Generator().manual_seed(batch_idx)
        given = torch.zeros(b, v, dtype=torch.bool, device=self.device)
        given[:, 0] = True  # the sampling case: one input image
        loss = self.diffusion_loss(batch, given, generator=gen, drop_context=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=b, sync_dist=True)
        if batch_idx < self.hparams.val_renders and not self.trainer.sanity_checking:
            self._render(batch, batch_idx)

    @torch.no_grad()
    def sample_views(self, frames: torch.Tensor, c2w: torch.Tensor, Ks: torch.Tensor, given: torch.Tensor,
                     num_steps: int, cfg: float, cfg_min: float, seed: int = 0, on_step=None) -> torch.Tensor:
        """Generate the non-given views of one window.

        frames: ``(V, 3, H, W)`` [0, 1] (used at given views only); c2w: ``(V, 4, 4)``; Ks: ``(V, 3, 3)``;
        given: ``(V,)`` bool. Returns ``(V, 3, H, W)`` decoded views (given views re-decoded).
        """
        latents, plucker, context = self.condition(frames[None], c2w[None], Ks[None], given[None])
        poses = normalize_poses(c2w[None].double(), first_given_index(given[None]), self.hparams.camera_scale)[0]
        return self.vae.decode(self._sample_latents(latents, plucker, context, poses, given, num_steps,
                                                    cfg, cfg_min, seed, on_step)[0])

    def _sample_latents(self, latents, plucker, context, poses, given, num_steps, cfg, cfg_min, seed, on_step=None):
        from diffusers import EulerDiscreteScheduler

        scheduler = EulerDiscreteScheduler.from_config(self.noise_scheduler.config, timestep_spacing="linspace")
        scales = view_guidance_scales(poses.float(), given, cfg, cfg_min).to(self.device)
        uncond = torch.zeros_like(context)

        def denoise(x, t, cond):
            with torch.autocast(self.device.type, enabled=False):
                return self.unet(x, t.reshape(1).to(self.device), given[None], plucker,
                                 context if cond else uncond).float()

        gen = torch.Generator(device=self.device).manual_seed(int(seed))
        return sample_window(denoise, scheduler, latents, given.to(self.device), scales, num_steps, gen, on_step)

    def _render(self, batch: dict[str, Any], batch_idx: int) -> None:
        from d4d.data.video import encode_mp4
        from d4d.video.io import to_uint8

        frames, c2w, Ks = batch["frames"][0], batch["c2w"][0], batch["Ks"][0]
        given = torch.zeros(frames.shape[0], dtype=torch.bool, device=self.device)
        given[0] = True
        h = self.hparams
        out = self.sample_views(frames, c2w, Ks, given, h.val_sample_steps, h.cfg, h.cfg_min, seed=batch_idx)
        if bool(batch.get("has_depth", torch.zeros(1))[0]):
            err = reprojection_error(out, batch["depth"][0], Ks, c2w)
            self.log("val/reproj_err", err, batch_size=1)
        video = torch.cat([frames, out], -1)  # ground truth | generated
        plot_dir = Path(h.plot_dir or os.path.join(self.trainer.default_root_dir, "plots"))
        plot_dir.mkdir(parents=True, exist_ok=True)
        path = plot_dir / f"val_step{self.global_step:07d}_{batch_idx}.mp4"
        arr = to_uint8(video)
        arr = arr[:, : arr.shape[1] // 2 * 2, : arr.shape[2] // 2 * 2]
        path.write_bytes(encode_mp4(arr, fps=4.0, qp=18))
        for logger in self.loggers:
            if hasattr(logger, "log_video"):  # wandb
                logger.log_video(key=f"val/render_{batch_idx}", videos=[str(path)], step=self.global_step,
                                 format=["mp4"])

    # ---------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["d4d_stage"] = STAGE
        checkpoint[META_KEY] = {
            "unet_config": self._unet_config,
            "vae_config": None if self.vae.vae is None else _config_dict(self.vae.vae.config),
            "image_encoder_config": self.image_encoder.encoder.config.to_dict(),
        }

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        weights: str | None = None) -> "StaticVideoModule":
        """Rebuild a trained module (eval mode) from a checkpoint written by :meth:`on_save_checkpoint`,
        without fetching the base weights again. ``weights``: ``"ema"``, ``"raw"`` or None (the EMA
        weights when the checkpoint holds them, :func:`d4d.callbacks.ema.sampling_state_dict`)."""
        from d4d.callbacks.ema import sampling_state_dict

        path = Path(path)
        ckpt = read_checkpoint(path, map_location=map_location)
        if ckpt.get("d4d_stage") != STAGE or META_KEY not in ckpt:
            raise UserError(f"{path} is not a static-module checkpoint (d4d_stage={ckpt.get('d4d_stage')!r})")
        meta = ckpt[META_KEY]
        hp = dict(ckpt["hyper_parameters"])
        hp.update(unet=meta["unet_config"], vae=meta["vae_config"], image_encoder=meta["image_encoder_config"],
                  unet_subfolder=None, vae_subfolder=None, image_encoder_subfolder=None)
        # "activation_checkpointing": a module option of checkpoints written before it became d4d.fit's
        hp = {k: v for k, v in hp.items() if not k.startswith("_") and k != "activation_checkpointing"}
        state, module_weights = sampling_state_dict(ckpt, weights, path)
        module = cls(**hp)
        module.load_state_dict(state)
        module.sampling_weights = module_weights
        return module.eval()

    # ------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, request: VideoRequest, progress: ProgressFn | None = None) -> VideoResult:
        """One image + camera path -> ``F`` frames, in chunks anchored on generated views
        (:func:`~d4d.models.static.sampling.plan_chunks`). Generates at ``image_size`` and resizes
        to the path's ``(height, width)``; frame 0 is the input image."""
        h = self.hparams
        cfg, cfg_min = check_guidance(request.guidance, h.cfg, h.cfg_min)
        steps = int(request.num_steps or h.num_steps)
        if steps < 1:
            raise UserError(f"num_steps must be >= 1, got {steps}")
        cam = request.camera
        if request.image.ndim != 3 or request.image.shape[0] != 3:
            raise UserError(f"request.image must be (3, H, W), got {tuple(request.image.shape)}")
        start = time.perf_counter()
        size = tuple(int(s) for s in h.image_size)
        dev = self.device
        image = F.interpolate(request.image[None].float().to(dev), size=size, mode="bilinear",
                              align_corners=False, antialias=True).clamp(0, 1)
        K = resize_intrinsics(cam.K.double(), (cam.height, cam.width), size).to(dev)
        c2w = cam.c2w.double().clone().to(dev)
        c2w[:, :3, 3] *= request.trajectory_scale
        n = cam.num_frames
        chunks = plan_chunks(n, int(h.sample_window))
        lat0 = self.vae.encode(image)
        latents = lat0.new_zeros(n, *lat0.shape[1:])
        latents[0] = lat0[0]
        context = self.image_encoder(image[None], torch.ones(1, 1, dtype=torch.bool, device=dev))
        total, done = len(chunks) * steps, 0

        def tick():
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total, "static sampling")

        for i, chunk in enumerate(chunks):
            idx = list(chunk.given) + list(chunk.targets)
            given = torch.zeros(len(idx), dtype=torch.bool, device=dev)
            given[: len(chunk.given)] = True
            poses = normalize_poses(c2w[idx][None], torch.zeros(1, dtype=torch.long, device=dev), h.camera_scale)
            plucker = latent_plucker(poses, K.expand(len(idx), 3, 3)[None], size, tuple(lat0.shape[-2:]))
            out = self._sample_latents(latents[idx][None], plucker.to(dev), context, poses[0], given, steps,
                                       cfg, cfg_min, request.seed * 1000 + i, tick)
            latents[list(chunk.targets)] = out[0, len(chunk.given):]
        frames = torch.cat([self.vae.decode(latents[j:j + 16]) for j in range(0, n, 16)])
        frames = F.interpolate(frames, size=(cam.height, cam.width), mode="bilinear", align_corners=False,
                               antialias=True).clamp(0, 1).cpu()
        if tuple(request.image.shape[-2:]) == (cam.height, cam.width):
            frames[0] = request.image.float().clamp(0, 1).cpu()
        info = {"stage": STAGE, "steps": steps, "guidance": {"cfg": cfg, "cfg_min": cfg_min}, "seed": request.seed,
                "window": int(h.sample_window), "chunks": [dataclass_dict(c) for c in chunks],
                "seconds": round(time.perf_counter() - start, 2)}
        return VideoResult(frames=frames, camera=CameraPath(cam.c2w.clone(), cam.K.clone(), cam.height, cam.width,
                                                            cam.label), info=info)


def dataclass_dict(chunk) -> dict[str, Any]:
    return {"given": list(chunk.given), "targets": list(chunk.targets), "stage": chunk.stage}

