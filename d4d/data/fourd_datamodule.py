"""DataModule of the 4D generator: posed clip windows, one image size (aspect ratio) per batch.

Windows are cut by :class:`d4d.data.clip_datamodule.ClipWindow` (random stride, poses relative to
the first frame of the window, resize to cover + centre crop with the intrinsics adjusted by
:func:`d4d.geometry.cameras.resize_and_center_crop`, depth resized nearest). For the 512 stage
``image_sizes`` lists several ``[H, W]`` (DUSt3R: 384x512, 336x512, 288x512, 256x512, 160x512); each
training batch draws one of them, so all its samples share a shape. Validation and test batches use
the first size.

Batch (already collated, the loader's ``batch_size`` is None): ``frames (B, F, 3, H, W)`` float
[0, 1], ``c2w (B, F, 4, 4)`` (frame 0 the identity), ``K (B, F, 3, 3)``, ``depth (B, F, H, W)``
(0 where unknown), ``has_depth (B,)``, ``metric (B,)`` (meta ``metric_depth``), ``dynamic (B,)``,
``key`` (list of str).

Clips the generator cannot use are skipped and counted with a reason, through the shard reader's
skip accounting (:mod:`d4d.data.skips`: one warning line each, the ``max_skip_fraction`` threshold,
an error for a pass without one usable clip), before batching, so batches stay full: no camera
(``no_camera``), fewer frames than ``num_frames`` (``too_few_frames``) and, depending on
``missing_depth``, no ``depth.npy`` (``no_depth``).

Missing depth: the depth of a clip is the supervision of the reconstruction loss (its points and
scale, :mod:`d4d.fourd.losses`), so a clip without ``depth.npy`` cannot be trained on with zeros in
its place (no valid pixel: no point loss, and the scale used by the pose loss collapses).
:class:`d4d.modules.fourdgen.FourDGenModule` supervises such a clip with the temporal-structure
initialisation's depth when ``model.init_depth`` is set. ``missing_depth="auto"`` (default) keeps
depthless clips (``has_depth`` False) when the model being trained has ``init_depth`` (or
``init_depth_config``) and skips them otherwise; ``"initialise"`` always keeps them, ``"skip"``
always skips them. Without a trainer to ask (the loaders used on their own), ``auto`` keeps them.
"""
from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from d4d.data.clip_datamodule import ClipWindow, require_epoch_length
from d4d.data.schema import ClipSample
from d4d.data.resumable import ResumableDataLoader
from d4d.data.shards import ClipShardDataset, build_clip_pipeline, expand_urls
from d4d.data.skips import NO_CAMERA, NO_DEPTH, TOO_FEW_FRAMES, SkipSample
from d4d.utils.errors import UserError
from d4d.utils.logging import get_logger

log = get_logger(__name__)

BATCH_KEYS = ("frames", "c2w", "K", "depth", "has_depth", "metric", "dynamic")
MISSING_DEPTH = ("auto", "skip", "initialise")


class _AspectBatches(IterableDataset):
    """Reads ClipSamples, groups ``batch_size`` of them, cuts all windows of a batch at one size."""

    def __init__(self, urls: list[str], sizes: list[tuple[int, int]], num_frames: int, stride: tuple[int, int],
                 batch_size: int, train: bool, shuffle: int, epoch_length: int | None, seed: int,
                 keep_depthless: bool = True, max_skip_fraction: float = 0.05):
        super().__init__()
        self.urls, self.sizes, self.num_frames, self.stride = urls, sizes, num_frames, stride
        self.batch_size, self.train, self.shuffle, self.epoch_length, self.seed = batch_size, train, shuffle, epoch_length, seed
        self.keep_depthless, self.max_skip_fraction = keep_depthless, max_skip_fraction
        self.epoch = 0
        self.stream: ClipShardDataset | None = None  # this process's last reader (its ``stats``)

    def usable(self, clip: ClipSample) -> ClipSample:
        """The clip, if the generator can train on it; else :class:`SkipSample` with the reason."""
        where = f"sample {clip.key!r}" + (f" in {clip.shard}" if clip.shard else "")
        if clip.c2w is None or clip.K is None:
            raise SkipSample(NO_CAMERA, f"{where}: no camera (c2w.npy / intrinsics.npy); the 4D generator "
                                        "trains on posed clips")
        if clip.num_frames < self.num_frames:
            raise SkipSample(TOO_FEW_FRAMES, f"{where}: {clip.num_frames} frames, fewer than "
                                             f"data.num_frames={self.num_frames}")
        if clip.depth is None and not self.keep_depthless:
            raise SkipSample(NO_DEPTH, f"{where}: no depth.npy, and the model has no depth to supervise it "
                                       "with (set model.init_depth, or data.missing_depth)")
        return clip

    def set_epoch(self, epoch: int) -> None:
        """A new clip order and new crops per epoch (called by :class:`ResumableDataLoader`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per epoch: known only for training with ``epoch_length`` (make it a multiple of
        ``num_workers * batch_size``)."""
        if not (self.train and self.epoch_length):
            raise TypeError("the number of batches is known only with epoch_length")
        return -(-self.epoch_length // self.batch_size)

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        out = {k: torch.stack([it[k] for it in items]) for k in BATCH_KEYS}
        out["key"] = [it["key"] for it in items]
        return out

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        seed = self.seed + 7919 * self.epoch
        rng = random.Random(seed * 7919 + wid + torch.initial_seed() % 100_000)
        windows = {}
        for hw in self.sizes:
            windows[hw] = ClipWindow(self.num_frames, hw, self.stride, 0.0, None, self.train, self.seed)
            windows[hw].rng.seed(rng.random())
        # clips the generator cannot use are skipped and counted by the reader (self.usable), so every
        # clip reaching a batch is usable: batches stay full, and a pass of unusable clips is an error
        stream = build_clip_pipeline(self.urls, shuffle=self.shuffle if self.train else 0,
                                     resampled=self.train and self.epoch_length is not None,
                                     epoch_length=self.epoch_length if self.train else None, seed=seed,
                                     split_by_node=self.train,  # evaluation: every rank reads it whole
                                     max_skip_fraction=self.max_skip_fraction, transform=self.usable)
        self.stream = stream
        pending: list[ClipSample] = []

        def emit(clips: list[ClipSample]):
            hw = rng.choice(self.sizes) if self.train else self.sizes[0]
            items = []
            for clip in clips:
                item = windows[hw](clip)
                item["metric"] = torch.tensor(bool(clip.meta.get("metric_depth", False)))
                item["K"] = item.pop("Ks")
                items.append(item)
            return self._collate(items)

        for clip in stream:
            pending.append(clip)
            if len(pending) == self.batch_size:
                batch = emit(pending)
                pending = []
                yield batch
        if pending:
            yield emit(pending)


class FourDDataModule(L.LightningDataModule):
    """Shards of posed clips -> batches of windows for the reconstruction network (module docstring).

    Args:
        train_shards / val_shards / test_shards: shard specs (directory, brace pattern, glob, URL, list;
            :mod:`d4d.data.urls`).
        num_frames: frames per window. image_sizes: list of ``[H, W]``; training draws one per batch.
        stride_min / stride_max: frame stride range of training windows (evaluation: stride_min).
        batch_size, val_batch_size, num_workers, shuffle (buffer), epoch_length (samples per epoch per
        rank, None = one pass, one process only), seed. Multi-process runs: as
        :class:`~d4d.data.clip_datamodule.ClipDataModule` (evaluation read whole by every rank).
        missing_depth: ``auto``, ``skip`` or ``initialise``: what to do with a clip without
            ``depth.npy`` (module docstring).
        max_skip_fraction: the skip threshold of :class:`d4d.data.skips.SkipStats`.
    """

    def __init__(self, train_shards: str | list[str], val_shards: str | list[str] | None = None,
                 test_shards: str | list[str] | None = None, num_frames: int = 4,
                 image_sizes: list[tuple[int, int]] = ((224, 224),), stride_min: int = 1, stride_max: int = 2,
                 batch_size: int = 4, val_batch_size: int | None = None, num_workers: int = 4,
                 shuffle: int = 64, epoch_length: int | None = None, seed: int = 0,
                 missing_depth: str = "auto", max_skip_fraction: float = 0.05):
        super().__init__()
        sizes = [tuple(int(v) for v in hw) for hw in image_sizes]
        if not sizes or any(len(hw) != 2 or min(hw) < 1 for hw in sizes):
            raise UserError(f"data.image_sizes must be a non-empty list of [H, W], got {image_sizes}")
        if num_frames < 1 or stride_min < 1 or stride_max < stride_min:
            raise UserError(f"data: need num_frames >= 1 and 1 <= stride_min <= stride_max, got "
                            f"{num_frames}, {stride_min}, {stride_max}")
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}")
        if missing_depth not in MISSING_DEPTH:
            raise UserError(f"data.missing_depth must be one of {', '.join(MISSING_DEPTH)}, "
                            f"got {missing_depth!r}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise UserError(f"data.max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        self.save_hyperparameters()
        self.sizes = sizes
        self.urls: dict[str, list[str]] = {}

    def setup(self, stage: str) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in wanted:
            spec = getattr(self.hparams, f"{split}_shards")
            if spec:
                try:
                    self.urls[split] = expand_urls(spec)
                except ValueError as exc:
                    raise UserError(f"data.{split}_shards: {exc}") from None
        if stage == "fit" and "train" not in self.urls:
            raise UserError("data.train_shards: not set")
        if stage == "fit":
            require_epoch_length(self, self.hparams.epoch_length)

    @property
    def micro_batch_size(self) -> int:
        """Samples per training step on one rank (the loader batches by itself: ``batch_size=None``)."""
        return int(self.hparams.batch_size)

    def keep_depthless(self) -> bool:
        """Whether clips without depth.npy are kept (for the model's initialisation depth) or skipped."""
        mode = self.hparams.missing_depth
        if mode != "auto":
            return mode == "initialise"
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if model is None:
            return True  # no model to ask: keep them, marked has_depth False
        h = getattr(model, "hparams", None) or {}
        keep = bool(h.get("init_depth")) or h.get("init_depth_config") is not None
        if not keep:
            log.info("clips without depth.npy are skipped: model.init_depth is not set, "
                     "so nothing can supervise them")
        return keep

    def _loader(self, split: str, train: bool) -> DataLoader | list:
        h = self.hparams
        urls = self.urls.get(split)
        if not urls:
            return []
        batch = h.batch_size if train else (h.val_batch_size or h.batch_size)
        data = _AspectBatches(urls, self.sizes, h.num_frames, (h.stride_min, h.stride_max), batch, train,
                              h.shuffle, h.epoch_length, h.seed, self.keep_depthless(), h.max_skip_fraction)
        workers = min(h.num_workers, len(urls))
        if train:  # its position within an epoch is saved in checkpoints and restored on resume
            return ResumableDataLoader(data, batch_size=None, num_workers=workers, seed=h.seed)
        return DataLoader(data, batch_size=None, num_workers=workers)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)
