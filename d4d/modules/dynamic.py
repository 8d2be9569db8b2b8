"""LightningModule of the dynamic module: camera-controlled Wan 2.1 I2V (paper "Dynamic Module").

Training (``reference.md`` sections 1, 3, 4, 6): rectified flow as Wan trains it. For clean latents
``x0`` and noise ``e``, ``sigma`` is drawn uniformly and shifted with Wan's ``flow_shift``
(``sigma' = s sigma / (1 + (s - 1) sigma)``, diffusers' FlowMatchEulerDiscreteScheduler), the model sees
``x_t = (1 - sigma) x0 + sigma e`` at timestep ``1000 sigma`` and regresses the velocity ``e - x0``
(MSE). Each condition is dropped independently per clip so that both guidance terms are trained:
text (the empty prompt's embedding), image (zeroed CLIP states; the first-frame latents stay, as in
I2V they define the task) and camera (the camera branches add nothing, i.e. the base model).

Sampling: FlowMatchEulerDiscreteScheduler, default 25 steps, with two guidance terms (section 6)::

    v = v(img) + camera_cfg * (v(img, cam) - v(img)) + text_cfg * (v(img, cam, text) - v(img, cam))

Defaults text 5.5, camera 1.0 (then ``v(img)`` is not evaluated). Checkpoints carry
``d4d_stage: "dynamic"``; with a pretrained backbone they hold only the trained weights and reload
the frozen base from ``backbone``.
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

from d4d.models.dynamic import DynamicWan, build_tiny_wan, load_wan
from d4d.models.dynamic.backbone import cast_frozen, local_device, parse_dtype
from d4d.utils.checkpoints import read_checkpoint
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger
from d4d.video.interface import CameraPath, ProgressFn, VideoRequest, VideoResult

log = get_logger(__name__)
STAGE = "dynamic"
GUIDANCE_DEFAULTS = {"text": 5.5, "camera": 1.0}
FROZEN_PREFIXES = ("model.vae.", "model.text_encoder.", "model.image_encoder.", "model.transformer.")


def _adamw(params):
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)


class DynamicVideoModule(L.LightningModule):
    """Builds :class:`~d4d.models.dynamic.DynamicWan`, trains its camera branches, samples videos.

    Args:
        backbone: Wan 2.1 I2V diffusers directory or hub id; ``None`` builds a tiny random backbone
            from ``tiny`` (:data:`d4d.models.dynamic.backbone.TINY_DEFAULTS` keys).
        camera_blocks / epipolar_blocks: ``"all"``, ``"none"`` or block indices.
        camera_hidden, num_registers, occlusion, epipolar_chunk_frames, epipolar_backend, lora_rank,
            train_base: see DynamicWan (``train_base`` unfreezes the transformer: full fine-tuning or
            pre-training; ``epipolar_backend``: ``"dense"``, ``"flex"`` or ``"auto"`` = flex on CUDA;
            ``epipolar_projections``: ``"copy"`` or ``"shared"``, see docs/dynamic.md).
        frozen_dtype: dtype the pretrained backbone's frozen parts (transformer, UMT5, CLIP) are
            loaded and kept in: ``"bfloat16"`` (the full recipe: 45 GB instead of 91 GB per rank) or
            ``"float32"``; trainable weights (camera and epipolar branches, LoRA) are float32 either
            way. load_device: where ``backbone`` is read to (``"auto"``: the rank's own GPU when
            CUDA is available, so host memory holds no copy; else the CPU).
        flow_shift: Wan's timestep shift (3.0 at 480p). trajectory_scale: CamI2V trace scale.
        text_drop / image_drop / camera_drop: per-clip condition dropout probabilities.
        num_steps, text_cfg, camera_cfg: sampling defaults (25, 5.5, 1.0).
        val_samples / val_steps: clips sampled and logged at each validation (0 = none).
        plot_dir: where sample pictures go (default ``<run_dir>/plots``).
    """

    stage = STAGE

    def __init__(self, backbone: str | None = None, tiny: dict[str, Any] | None = None,
                 camera_blocks: str | list[int] = "all", epipolar_blocks: str | list[int] = "all",
                 camera_hidden: int = 256, num_registers: int = 4, occlusion: bool = True,
                 epipolar_chunk_frames: int = 4, epipolar_backend: str = "auto", epipolar_projections: str = "copy",
                 lora_rank: int = 0,
                 train_base: bool = False, frozen_dtype: str = "float32", load_device: str = "auto", flow_shift: float = 3.0,
                 trajectory_scale: float = 1.0, text_drop: float = 0.1, image_drop: float = 0.1,
                 camera_drop: float = 0.1,
                 num_steps: int = 25, text_cfg: float = 5.5, camera_cfg: float = 1.0,
                 val_samples: int = 2, val_steps: int | None = None, fps: float = 8.0,
                 plot_dir: str | None = None, seed: int = 0,
                 optimizer: OptimizerCallable = _adamw, scheduler: LRSchedulerCallable | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        for key in ("text_drop", "image_drop", "camera_drop"):
            if not 0.0 <= getattr(self.hparams, key) <= 1.0:
                raise UserError(f"model.{key} must be in [0, 1], got {getattr(self.hparams, key)}")
        if tiny is not None and backbone is not None:
            raise UserError("model.tiny builds a random backbone: set model.backbone to null to use it")
        dtype = parse_dtype(frozen_dtype, "model.frozen_dtype")
        if dtype != torch.float32 and train_base:
            raise UserError(f"model.train_base trains the transformer: set model.frozen_dtype to float32 "
                            f"(got {frozen_dtype})")
        if backbone:
            parts = load_wan(backbone, dtype, local_device(load_device))
        else:
            parts = cast_frozen(build_tiny_wan(tiny, seed), dtype)
        self.model = DynamicWan(parts, camera_blocks, epipolar_blocks, camera_hidden, num_registers, occlusion,
                                epipolar_chunk_frames, lora_rank, train_base, epipolar_backend, epipolar_projections)
        for p in self.model.trainable_parameters():  # peft makes LoRA weights in their base layer's dtype
            p.data = p.data.float()  # trainable weights stay float32 masters whatever frozen_dtype is
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.strict_loading = False  # pretrained base weights are not in our checkpoints
        # with a pretrained backbone, frozen weights are reloaded from it: DeepSpeed checkpoints leave
        # them out too (AtomicDeepSpeedStrategy), ~46 GB per checkpoint at full size
        self.checkpoint_frozen_weights = not backbone
        self._null_text: torch.Tensor | None = None
        self.training_data: dict[str, Any] = {}  # num_frames, image_size of the training clips

    # ---------------------------------------------------------------------------------- helpers
    def null_text(self, batch: int) -> torch.Tensor:
        if self._null_text is None or self._null_text.device != self.device:
            self._null_text = self.model.encode_text([""])
        return self._null_text.expand(batch, -1, -1)

    def _conditions(self, frames, c2w, K, captions, depth=None, trajectory_scale=None):
        m = self.model
        hw = tuple(frames.shape[-2:])
        m.check_frames(frames.shape[1], *hw)
        cond = m.image_condition(frames[:, 0], frames.shape[1])
        scale = self.hparams.trajectory_scale if trajectory_scale is None else trajectory_scale
        camera, mask = m.camera_inputs(c2w, K, hw, scale, depth)
        return cond, m.encode_text(list(captions)), m.encode_image(frames[:, 0]), camera, mask

    def _flow_sigmas(self, n: int, generator=None) -> torch.Tensor:
        u = torch.rand(n, device=self.device, generator=generator)
        s = self.hparams.flow_shift
        return s * u / (1 + (s - 1) * u)

    def flow_loss(self, batch: dict[str, Any], generator=None, dropout: bool = True) -> torch.Tensor:
        """Flow-matching loss of a batch of raw windows (``frames``) or precomputed ones (``latents``)."""
        c2w, K = batch["c2w"], batch["K"]
        # clips without depth have depth 0 (unknown): their masks use the depth-free test (clip_epipolar_spans)
        depth = batch["depth"].float() if "has_depth" in batch else None
        if "latents" in batch:  # data_prep.precompute_latents
            x0, cond = batch["latents"].float(), batch["condition"].float()
            text, image = batch["text"].float(), batch["image"].float()
            camera, mask = self.model.camera_inputs(c2w, K, tuple(batch["depth"].shape[-2:]),
                                                    self.hparams.trajectory_scale, depth)
        else:
            frames = batch["frames"]
            x0 = self.model.encode_video(frames)
            cond, text, image, camera, mask = self._conditions(frames, c2w, K, batch["caption"], depth)
        b = x0.shape[0]
        h = self.hparams

        def drop(p, device=self.device):
            if not dropout or p <= 0:
                return torch.zeros(b, dtype=torch.bool, device=device)
            return torch.rand(b, device=device, generator=generator) < p

        text = torch.where(drop(h.text_drop)[:, None, None], self.null_text(b).to(text.dtype), text)
        image = image * (~drop(h.image_drop)).to(image.dtype)[:, None, None]
        # camera dropout drawn on the CPU (unless the generator given lives on the device): the model then
        # knows on the host whether any clip keeps its camera, without a device sync (DynamicWan.forward)
        on_host = generator is None or generator.device.type == "cpu"
        keep = (~drop(h.camera_drop, "cpu" if on_host else self.device)).float()
        sigma = self._flow_sigmas(b, generator)
        noise = torch.randn(x0.shape, device=self.device, generator=generator, dtype=x0.dtype)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        pred = self.model(noisy, sigma * 1000, cond, text, image, camera, mask, keep)
        return F.mse_loss(pred.float(), (noise - x0).float())

    # ------------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.flow_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["c2w"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        gen = torch.Generator(self.device).manual_seed(1000 + batch_idx)
        loss = self.flow_loss(batch, generator=gen, dropout=False)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["c2w"].shape[0], sync_dist=True)
        if batch_idx == 0 and "frames" in batch and self.hparams.val_samples > 0 and not self.trainer.sanity_checking:
            self._log_samples(batch)

    def on_init_from(self, missing: list[str]) -> None:
        """``init_from`` a checkpoint without epipolar branches (e.g. a base pre-trained with
        ``train_base``): their q/k/v become copies of the *loaded* attention, not of the one they were
        built on."""
        fresh = sorted({k.split(".")[2] for k in missing if k.startswith("model.epipolar.") and ".to_q." in k})
        self.model.recopy_branches(fresh)

    def on_fit_start(self) -> None:
        self._check_precomputed(getattr(self.trainer, "datamodule", None))

    def _check_precomputed(self, datamodule) -> None:
        """Latents precomputed with other encoders than this model's would train on garbage: refuse."""
        from d4d.models.dynamic.backbone import backbone_spec

        mine = backbone_spec(self.hparams.backbone, self.hparams.tiny, self.hparams.seed)
        for split, manifest in (getattr(datamodule, "manifest", None) or {}).items():
            theirs = {k: manifest.get(k) for k in mine}
            if theirs != mine:
                folder = datamodule.hparams.get(f"{split}_dir", split)
                raise UserError(f"data.{split}_dir: {folder} was encoded with {theirs}, but the model is {mine} "
                                "(re-run python -m data_prep.precompute_latents with the model's backbone)")

    def configure_optimizers(self):
        params = self.model.trainable_parameters()
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "step"}}

    def _log_samples(self, batch) -> None:
        from d4d.video.io import to_uint8, video_path_figure

        n = min(self.hparams.val_samples, batch["frames"].shape[0])
        steps = self.hparams.val_steps or self.hparams.num_steps
        video = self.sample(batch["frames"][:n, 0], batch["c2w"][:n], batch["K"][:n], batch["caption"][:n],
                            num_steps=steps, seed=self.hparams.seed)
        if not self.trainer.is_global_zero:
            return
        import matplotlib.pyplot as plt

        from d4d.data.video import encode_mp4

        plot_dir = Path(self.hparams.plot_dir or os.path.join(self.trainer.default_root_dir, "plots"))
        plot_dir.mkdir(parents=True, exist_ok=True)
        pictures, videos = [], []
        for i in range(n):
            stem = plot_dir / f"val_step{self.global_step:06d}_{i}"
            fig = video_path_figure(video[i], batch["c2w"][i], title=f"{batch['motion'][i] or 'clip'}: {batch['caption'][i][:60]}")
            fig.savefig(f"{stem}.png", dpi=90)
            plt.close(fig)
            both = torch.cat([batch["frames"][i].to(video.dtype), video[i]], -1)  # real | generated
            frames = to_uint8(both)
            frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]
            Path(f"{stem}.mp4").write_bytes(encode_mp4(frames, fps=self.hparams.fps, qp=18))
            pictures.append(f"{stem}.png")
            videos.append(f"{stem}.mp4")
        for logger in self.loggers:
            if hasattr(logger, "log_video"):  # wandb
                logger.log_image(key="val/sample_paths", images=pictures, step=self.global_step)
                logger.log_video(key="val/samples", videos=videos, step=self.global_step)

    # -------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, image: torch.Tensor, c2w: torch.Tensor, K: torch.Tensor, prompts: list[str],
               num_steps: int | None = None, text_cfg: float | None = None, camera_cfg: float | None = None,
               trajectory_scale: float | None = None, seed: int = 0, progress: ProgressFn | None = None,
               use_camera: bool = True, decode: bool = True) -> torch.Tensor:
        """Generate ``(B, F, 3, H, W)`` in [0, 1] from ``image (B, 3, H, W)``, ``c2w (B, F, 4, 4)``, ``K (B, 3, 3)``.

        ``use_camera=False`` samples the same model with its camera input dropped (ablation);
        ``decode=False`` returns the normalised latents ``(B, z, T, h, w)`` instead of frames.
        """
        b, num_frames = c2w.shape[:2]
        image, c2w, K = image.to(self.device), c2w.to(self.device), K.to(self.device)
        video_stub = image[:, None].expand(b, num_frames, *image.shape[1:])
        cond, text, clip, camera, mask = self._conditions(video_stub, c2w, K, prompts, None, trajectory_scale)
        x = self.denoise(cond, text, clip, camera, mask, num_steps, text_cfg, camera_cfg, seed, progress, use_camera)
        return self.model.decode(x) if decode else x

    @torch.no_grad()
    def denoise(self, cond: torch.Tensor, text: torch.Tensor, clip: torch.Tensor, camera: torch.Tensor,
                mask: torch.Tensor | None, num_steps: int | None = None, text_cfg: float | None = None,
                camera_cfg: float | None = None, seed: int = 0, progress: ProgressFn | None = None,
                use_camera: bool = True) -> torch.Tensor:
        """Euler flow-matching sampling from encoded conditions (:meth:`_conditions` or precomputed
        shards) -> normalised latents ``(B, z, T, h, w)``. Text guidance ``v_cam + s_t (v_full - v_cam)``
        and camera guidance ``+ (s_c - 1)(v_cam - v_img)`` are separate terms (reference section 6)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        h = self.hparams
        steps = num_steps or h.num_steps
        s_text = h.text_cfg if text_cfg is None else text_cfg
        s_cam = h.camera_cfg if camera_cfg is None else camera_cfg
        b = cond.shape[0]
        cond, text, clip = cond.to(self.device).float(), text.to(self.device).float(), clip.to(self.device).float()
        null = self.null_text(b).to(text.dtype)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=h.flow_shift)
        sched.set_timesteps(steps, device=self.device)
        gen = torch.Generator(self.device).manual_seed(seed)
        shape = (b, cond.shape[1] - self.model.temporal_factor, *cond.shape[2:])
        x = torch.randn(shape, generator=gen, device=self.device)
        # on the CPU: DynamicWan reads them on the host (no device sync) and skips the branches when all 0
        on, off = (torch.ones(b) if use_camera else torch.zeros(b)), torch.zeros(b)
        for i, t in enumerate(sched.timesteps):
            ts = t.expand(b).to(x.dtype)
            v_full = self.model(x, ts, cond, text, clip, camera, mask, on)
            v = v_full
            if s_text != 1.0 or s_cam != 1.0:
                v_cam = self.model(x, ts, cond, null, clip, camera, mask, on)
                v = v_cam + s_text * (v_full - v_cam)
                if s_cam != 1.0:
                    v_img = self.model(x, ts, cond, null, clip, camera, mask, off)
                    v = v + (s_cam - 1.0) * (v_cam - v_img)
            x = sched.step(v, t, x).prev_sample
            if progress is not None:
                progress(i + 1, steps, "denoising")
        return x

    def generate(self, request: VideoRequest, progress: ProgressFn | None = None) -> VideoResult:
        """:class:`~d4d.video.interface.VideoGenerator`: one video for one request."""
        guidance = dict(GUIDANCE_DEFAULTS if request.guidance is None else {**GUIDANCE_DEFAULTS, **request.guidance})
        unknown = set(guidance) - set(GUIDANCE_DEFAULTS)
        if unknown:
            raise UserError(f"dynamic stage guidance: unknown terms {sorted(unknown)}; known: text, camera")
        for name, value in guidance.items():
            if not 0.0 <= value <= 20.0:
                raise UserError(f"dynamic stage guidance {name}={value}: expected a scale in [0, 20]")
        cam = request.camera
        image = request.image
        if tuple(image.shape[-2:]) != (cam.height, cam.width):
            image = F.interpolate(image[None].float(), size=(cam.height, cam.width), mode="bilinear",
                                  align_corners=False, antialias=True)[0]
        self.model.check_frames(cam.num_frames, cam.height, cam.width)
        start = time.perf_counter()
        steps = request.num_steps or self.hparams.num_steps
        frames = self.sample(image[None], cam.c2w[None], cam.K[None], [request.prompt], steps, guidance["text"],
                             guidance["camera"], request.trajectory_scale, request.seed, progress)[0]
        info = {"stage": STAGE, "steps": steps, "guidance": guidance, "seed": request.seed,
                "trajectory_scale": request.trajectory_scale, "seconds": round(time.perf_counter() - start, 3)}
        return VideoResult(frames.float().cpu(), CameraPath(cam.c2w, cam.K, cam.height, cam.width, cam.label), info)

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["d4d_stage"] = STAGE
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dh = getattr(dm, "hparams", {}) or {}
        if "num_frames" in dh:
            checkpoint["d4d_training_data"] = {"num_frames": int(dh["num_frames"]), "image_size": list(dh["image_size"])}
        if self.hparams.backbone:  # frozen pretrained weights are reloaded from the backbone
            trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith(FROZEN_PREFIXES) and k not in trainable]:
                del state[key]

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
                        weights: str | None = None) -> "DynamicVideoModule":
        """Rebuild the module (eval mode) from a checkpoint written by training. ``weights``: ``"ema"``,
        ``"raw"`` or None (the EMA weights when the checkpoint holds them)."""
        from d4d.callbacks.ema import sampling_state_dict

        path = Path(path)
        ckpt = read_checkpoint(path, map_location=map_location)
        if ckpt.get("d4d_stage") != STAGE:
            raise UserError(f"{path} is not a dynamic-stage checkpoint (d4d_stage={ckpt.get('d4d_stage')!r})")
        import inspect

        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k in accepted}  # drops LightningCLI's _class_path
        state, module_weights = sampling_state_dict(ckpt, weights, path)
        module = cls(**hp)
        missing, unexpected = module.load_state_dict(state, strict=False)
        module.sampling_weights = module_weights
        trainable = {f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad}
        lost = [k for k in missing if k in trainable or not k.startswith(FROZEN_PREFIXES)]
        if unexpected or lost:
            raise UserError(f"{path}: weights do not match the model (missing {lost[:3]}, unexpected {unexpected[:3]})")
        module.training_data = ckpt.get("d4d_training_data", {})
        return module.to(map_location).eval()
