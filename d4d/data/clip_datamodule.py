"""A general video-clip DataModule: fixed-length windows of posed clips for the video stages.

Each sample is a window of ``num_frames`` frames taken from a :class:`~d4d.data.schema.ClipSample`:

* a random frame stride ``s`` in ``[stride_min, stride_max]`` (the largest that fits when the clip
  is short; a clip shorter than ``num_frames`` is skipped as rejected);
* a random conditioning frame: the window starts at a random frame of the clip, and with
  probability ``reverse_prob`` it runs backwards from there (so any frame can be the conditioning
  frame, and both directions of a move are seen). Evaluation windows use the first frame, stride
  ``stride_min``, forwards;
* poses made relative to the conditioning frame (``c2w[0]`` the identity, ``reference.md`` section 1);
* frames resized to cover ``image_size`` and centre-cropped, intrinsics adjusted with the same numbers
  (:func:`d4d.geometry.cameras.resize_and_center_crop`); depth (nearest) when the shard has it.

Optional ``static_only`` / ``dynamic_only`` keep clips by their meta ``dynamic`` flag.

Batch (default collate): ``frames (B, F, 3, H, W)`` float [0, 1], ``c2w (B, F, 4, 4)``,
``K (B, 3, 3)`` (of the conditioning frame) and ``Ks (B, F, 3, 3)``, ``depth (B, F, H, W)`` (0 where
unknown), ``has_depth (B,)``, ``caption`` (list of str), ``motion`` (list of str, "" if unlabelled;
the window's camera motion, so a reversed zoom-in is a ``zoom_out``), ``dynamic (B,)`` bool,
``stride (B,)``, ``reversed (B,)`` bool, ``key`` (list of str).
"""
from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from d4d.data.schema import ClipSample, SampleError
from d4d.data.resumable import ResumableDataLoader
from d4d.data.shards import build_clip_pipeline, expand_urls
from d4d.geometry.cameras import relative_poses, resize_and_center_crop
from d4d.geometry.motions import REVERSED_MOTION
from d4d.utils.errors import UserError
from d4d.utils.safe_load import load_tensors


class ClipWindow:
    """The per-sample transform (picklable, so DataLoader workers can use it). ``rng=None``: eval."""

    def __init__(self, num_frames: int, image_size: tuple[int, int], stride: tuple[int, int],
                 reverse_prob: float, keep_dynamic: bool | None, train: bool, seed: int = 0):
        self.num_frames, self.image_size, self.stride = num_frames, image_size, stride
        self.reverse_prob, self.keep_dynamic, self.train = reverse_prob, keep_dynamic, train
        self.rng = random.Random(seed)

    def indices(self, length: int, key: str) -> tuple[list[int], int]:
        """Frame indices of one window and its stride (negative steps: the window runs backwards)."""
        n = self.num_frames
        if length < n:
            raise SampleError(f"sample {key!r}: {length} frames, fewer than num_frames={n}")
        s_max = min(self.stride[1], (length - 1) // max(1, n - 1)) if n > 1 else 1
        s_min = min(self.stride[0], s_max)
        if not self.train:
            return list(range(0, (n - 1) * s_min + 1, s_min)), s_min
        stride = self.rng.randint(s_min, s_max)
        span = (n - 1) * stride
        reverse = self.rng.random() < self.reverse_prob
        start = self.rng.randint(span, length - 1) if reverse else self.rng.randint(0, length - 1 - span)
        step = -stride if reverse else stride
        return [start + i * step for i in range(n)], stride

    def __call__(self, clip: ClipSample) -> dict[str, Any] | None:
        if self.keep_dynamic is not None and bool(clip.meta.get("dynamic", True)) != self.keep_dynamic:
            return None  # filtered out, not an error
        if clip.c2w is None or clip.K is None:
            raise SampleError(f"sample {clip.key!r}: no camera (c2w.npy / intrinsics.npy)")
        idx, stride = self.indices(clip.num_frames, clip.key)
        plan = resize_and_center_crop(clip.K[idx], clip.size, self.image_size)
        frames = plan.apply(clip.frames_float()[idx]).clamp(0, 1)
        height, width = self.image_size
        if clip.depth is not None:
            depth = plan.apply(clip.depth[idx][:, None], mode="nearest-exact")[:, 0]
        else:
            depth = torch.zeros(len(idx), height, width)
        c2w = relative_poses(clip.c2w[idx].double(), 0).float()
        backwards = len(idx) > 1 and idx[1] < idx[0]
        motion = clip.motion or ""
        if backwards and motion:  # the camera motion of the window, not of the clip
            motion = REVERSED_MOTION.get(motion, motion)
        return {
            "frames": frames, "c2w": c2w, "K": plan.K[0].float(), "Ks": plan.K.float(), "depth": depth.float(),
            "has_depth": torch.tensor(clip.depth is not None), "caption": clip.caption,
            "motion": motion, "dynamic": torch.tensor(bool(clip.meta.get("dynamic", True))),
            "stride": torch.tensor(stride), "reversed": torch.tensor(backwards), "key": clip.key,
        }


class _Windows(IterableDataset):
    def __init__(self, urls: list[str], transform: ClipWindow, train: bool, shuffle: int, epoch_length: int | None,
                 max_skip_fraction: float, seed: int):
        super().__init__()
        self.urls, self.transform, self.train = urls, transform, train
        self.shuffle, self.epoch_length, self.max_skip_fraction, self.seed = shuffle, epoch_length, max_skip_fraction, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A new window/shard order per epoch (called by :class:`ResumableDataLoader`)."""
        self.epoch = int(epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        seed = self.seed + 7919 * self.epoch
        self.transform.rng.seed(seed * 7919 + (info.id if info else 0) + torch.initial_seed() % 100_000)
        resampled = self.train and self.epoch_length is not None
        filtered = self.transform.keep_dynamic is not None
        # With a meta filter, epoch_length counts kept windows: resample without end and stop after
        # epoch_length kept ones (a filter that keeps nothing is an error, not an endless epoch).
        length = (1 << 40 if filtered else self.epoch_length) if resampled else None
        # Evaluation streams are read whole by every rank (see ClipDataModule): equal batch counts on
        # all ranks, which ZeRO-3 needs (a rank with fewer batches would wait in a parameter gather).
        stream = build_clip_pipeline(self.urls, shuffle=self.shuffle if self.train else 0, resampled=resampled,
                                     epoch_length=length, seed=seed, split_by_node=self.train,
                                     max_skip_fraction=self.max_skip_fraction, transform=self.transform)
        limit = None
        if resampled:  # epoch_length is per rank: each loader worker keeps its share, as unfiltered streams do
            worker, workers = (info.id, info.num_workers) if info else (0, 1)
            limit = self.epoch_length // workers + (worker < self.epoch_length % workers)
        return self._kept(stream, limit)

    def _kept(self, stream, limit: int | None):
        kept = rejected = 0
        for sample in stream:
            if sample is None:
                rejected += 1
                if kept == 0 and rejected >= self.MAX_REJECTED_BEFORE_FIRST:
                    break
                continue
            kept += 1
            yield sample
            if limit is not None and kept >= limit:
                return
        if kept == 0 and rejected:
            want = "static" if self.transform.keep_dynamic is False else "dynamic"
            raise UserError(f"{self.urls[0]}{' ...' if len(self.urls) > 1 else ''}: no {want} clip "
                            f"(meta 'dynamic') among {rejected} read; check data.static_only / dynamic_only")

    MAX_REJECTED_BEFORE_FIRST = 1_000


class ClipDataModule(L.LightningDataModule):
    """Shards of posed clips -> windows (module docstring).

    Args:
        train_shards / val_shards / test_shards: shard specs (brace patterns, directories, globs, URLs;
            :mod:`d4d.data.urls`).
        num_frames: frames per window (Wan: 1 + 4 k). image_size: ``[H, W]`` after resize + crop.
        stride_min / stride_max: random frame stride range (training).
        reverse_prob: chance that a training window runs backwards from its conditioning frame.
        static_only / dynamic_only: keep only clips whose meta ``dynamic`` is False / True.
        batch_size, val_batch_size, num_workers, shuffle (buffer), epoch_length (samples per epoch
        per rank; None = one pass over the shards, one process only), max_skip_fraction, seed.

    Multi-process runs: training draws shards with replacement (``epoch_length``, required there, so
    every rank has the same number of steps); validation and test are read whole by every rank, so
    all ranks run the same batches (their metrics equal a one-process run's, and no rank runs out of
    batches while the others wait in a collective); bound their cost with ``limit_val_batches``.
    """

    def __init__(self, train_shards: str | list[str], val_shards: str | list[str] | None = None,
                 test_shards: str | list[str] | None = None, num_frames: int = 49,
                 image_size: tuple[int, int] = (480, 832), stride_min: int = 1, stride_max: int = 4,
                 reverse_prob: float = 0.0, static_only: bool = False, dynamic_only: bool = False,
                 batch_size: int = 1, val_batch_size: int | None = None, num_workers: int = 4,
                 shuffle: int = 64, epoch_length: int | None = None, max_skip_fraction: float = 0.05, seed: int = 0):
        super().__init__()
        if static_only and dynamic_only:
            raise UserError("data.static_only and data.dynamic_only cannot both be true")
        if num_frames < 1 or stride_min < 1 or stride_max < stride_min:
            raise UserError(f"data: need num_frames >= 1 and 1 <= stride_min <= stride_max, got "
                            f"{num_frames}, {stride_min}, {stride_max}")
        if not 0.0 <= reverse_prob <= 1.0:
            raise UserError(f"data.reverse_prob must be in [0, 1], got {reverse_prob}")
        self.save_hyperparameters()
        self.urls: dict[str, list[str]] = {}

    def setup(self, stage: str) -> None:
        h = self.hparams
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"]}.get(stage, [])
        for split in wanted:
            spec = getattr(h, f"{split}_shards")
            if spec:
                try:
                    self.urls[split] = expand_urls(spec)
                except ValueError as exc:
                    raise UserError(f"data.{split}_shards: {exc}") from None
        if stage == "fit" and "train" not in self.urls:
            raise UserError("data.train_shards: not set")
        if stage == "fit":
            require_epoch_length(self, h.epoch_length)

    @property
    def micro_batch_size(self) -> int:
        """Samples per training step on one rank (DeepSpeed's ``train_micro_batch_size_per_gpu``)."""
        return int(self.hparams.batch_size)

    def _keep(self) -> bool | None:
        h = self.hparams
        return False if h.static_only else True if h.dynamic_only else None

    def _loader(self, split: str, train: bool) -> DataLoader | list:
        h = self.hparams
        urls = self.urls.get(split)
        if not urls:
            return []
        window = ClipWindow(h.num_frames, tuple(h.image_size), (h.stride_min, h.stride_max), h.reverse_prob,
                            self._keep(), train, h.seed)
        data = _Windows(urls, window, train, h.shuffle, h.epoch_length, h.max_skip_fraction, h.seed)
        workers = min(h.num_workers, len(urls))
        batch = h.batch_size if train else (h.val_batch_size or h.batch_size)
        if train:  # its position within an epoch is saved in checkpoints and restored on resume
            return ResumableDataLoader(data, batch_size=batch, num_workers=workers, seed=h.seed)
        return DataLoader(data, batch_size=batch, num_workers=workers, persistent_workers=False)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)


def world_size_of(datamodule: L.LightningDataModule) -> int:
    trainer = getattr(datamodule, "trainer", None)
    return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1


def require_epoch_length(datamodule: L.LightningDataModule, epoch_length: int | None) -> None:
    """One pass over shards split by rank gives ranks different step counts, and the rank that
    finishes first waits forever in the next collective: multi-process training needs ``epoch_length``."""
    world = world_size_of(datamodule)
    if world > 1 and epoch_length is None:
        raise UserError(f"data.epoch_length: required with {world} processes (samples per epoch per rank; "
                        "without it the ranks' shard shares give them different step counts and training hangs)")


# ------------------------------------------------------------------------------ precomputed latents
class _LatentFiles(IterableDataset):
    """Windows from ``latents-*.pt`` files of :mod:`data_prep.precompute_latents`, split over ranks
    and workers by file; text embeddings are zero-padded back to Wan's 512 tokens."""

    def __init__(self, files: list[str], shuffle: bool, seed: int, repeat: bool):
        super().__init__()
        self.files, self.shuffle, self.seed, self.repeat = files, shuffle, seed, repeat
        self.epoch = 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rank, world = 0, 1
        # a finite (evaluation) pass is read whole by every rank: equal batch counts on all ranks
        if self.repeat and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        rng = random.Random(self.seed + self.epoch)
        self.epoch += 1
        while True:
            files = list(self.files)
            if self.shuffle:
                rng.shuffle(files)
            mine = files[rank * nw + wid:: world * nw] or files[(rank * nw + wid) % len(files):][:1]
            for path in mine:
                items = load_tensors(path, what="precomputed latents")
                if self.shuffle:
                    rng.shuffle(items)
                for item in items:
                    yield _pad_text(item)
            if not self.repeat:
                return


def _pad_text(item: dict[str, Any]) -> dict[str, Any]:
    from d4d.models.dynamic.backbone import WAN_TEXT_TOKENS

    text = item["text"]
    out = dict(item)
    out["text"] = F.pad(text, (0, 0, 0, WAN_TEXT_TOKENS - text.shape[0]))
    if "frames" in out:  # uint8 (F, H, W, 3) -> float (F, 3, H, W) in [0, 1], as ClipDataModule
        out["frames"] = out["frames"].permute(0, 3, 1, 2).float() / 255.0
    return out


class PrecomputedClipDataModule(L.LightningDataModule):
    """Windows encoded by ``python -m data_prep.precompute_latents`` (same batch keys as
    :class:`ClipDataModule` minus ``frames`` unless kept, plus ``latents``, ``condition``, ``text``,
    ``image``). The manifest's backbone must match the model's (checked by the dynamic module).

    Args:
        train_dir / val_dir: output directories of the precompute step.
        batch_size, val_batch_size, num_workers, shuffle, seed; ``steps_per_epoch`` bounds a training
        epoch (the training stream repeats the files).
    """

    def __init__(self, train_dir: str, val_dir: str | None = None, batch_size: int = 1,
                 val_batch_size: int | None = None, num_workers: int = 2, shuffle: bool = True,
                 steps_per_epoch: int = 1000, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.files: dict[str, list[str]] = {}
        self.manifest: dict[str, Any] = {}

    def setup(self, stage: str) -> None:
        import glob
        import json
        import os

        h = self.hparams
        for split, folder in (("train", h.train_dir), ("val", h.val_dir)):
            if folder is None or (stage != "fit" and split == "train"):
                continue
            files = sorted(glob.glob(os.path.join(folder, "latents-*.pt")))
            manifest = os.path.join(folder, "manifest.json")
            if not files or not os.path.isfile(manifest):
                raise UserError(f"data.{split}_dir: {folder} holds no latents-*.pt and manifest.json "
                                "(run python -m data_prep.precompute_latents)")
            self.files[split] = files
            with open(manifest) as f:
                self.manifest[split] = json.load(f)

    @property
    def micro_batch_size(self) -> int:
        return int(self.hparams.batch_size)

    @property
    def num_frames(self) -> int | None:
        return self.manifest.get("train", self.manifest.get("val", {})).get("num_frames")

    def train_dataloader(self):
        h = self.hparams
        data = _LatentFiles(self.files["train"], h.shuffle, h.seed, repeat=True)
        from itertools import islice

        class _Bounded(IterableDataset):
            def __iter__(inner):
                info = torch.utils.data.get_worker_info()
                share = h.steps_per_epoch * h.batch_size // (info.num_workers if info else 1)
                return islice(iter(data), share)

            def __len__(inner):
                return h.steps_per_epoch * h.batch_size

        return DataLoader(_Bounded(), batch_size=h.batch_size, num_workers=min(h.num_workers, len(self.files["train"])))

    def val_dataloader(self):
        h = self.hparams
        if "val" not in self.files:
            return []
        return DataLoader(_LatentFiles(self.files["val"], False, h.seed, repeat=False),
                          batch_size=h.val_batch_size or h.batch_size, num_workers=0)
