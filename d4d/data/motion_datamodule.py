"""DataModule of the camera-motion classifier: episodes for training, labelled first frames for
validation and test, all read from shards of :mod:`d4d.data.schema`."""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from d4d.data.episodes import EpisodeStream, first_frame_and_label, to_model_input
from d4d.data.resumable import ResumableDataLoader
from d4d.data.shards import build_clip_pipeline, expand_urls
from d4d.utils.errors import UserError


def _resolve(spec: str | list[str] | None, key: str) -> list[str]:
    try:
        return expand_urls(spec)
    except ValueError as exc:
        raise UserError(f"data.{key}: {exc}") from None


class _LabelledImages(IterableDataset):
    """(image ``(3, S, S)``, label) pairs from a finite, non-resampled shard pass."""

    def __init__(self, urls: list[str], image_size: int, max_skip_fraction: float):
        super().__init__()
        self.urls, self.image_size, self.max_skip_fraction = urls, image_size, max_skip_fraction

    def __iter__(self):
        # read whole by every rank: equal batch counts on all ranks (ZeRO-3 gathers need every rank)
        pipeline = build_clip_pipeline(self.urls, shuffle=0, resampled=False, frame_indices=[0], split_by_node=False,
                                       max_skip_fraction=self.max_skip_fraction,
                                       transform=first_frame_and_label)
        for image, label in pipeline:
            if label >= 0:
                yield to_model_input(image, self.image_size), label


class MotionImageDataModule(L.LightningDataModule):
    """Shards -> few-shot episodes (train) and labelled first frames (val/test).

    Args:
        train_shards / val_shards / test_shards: brace patterns, directories, globs or URLs of shards
            whose samples carry ``meta.json`` ``motion`` labels (unlabelled samples are skipped).
        image_size: square model input side (Table 3: 224).
        n_way, k_shot, n_query: episode shape (Table 3: all 8 classes, 5 shots, 4 queries).
        episodes_per_epoch: Table 3: 20.
        pool_size: images kept per class for episode sampling.
        flip: horizontal flips with turn_left/turn_right label swap; brightness: jitter range.
        shuffle: shard-stream shuffle buffer; num_workers: DataLoader workers.
        max_skip_fraction: fail when more of the samples than this are corrupt or invalid.
    """

    def __init__(self, train_shards: str | list[str], val_shards: str | list[str] | None = None,
                 test_shards: str | list[str] | None = None, image_size: int = 224, n_way: int = 8,
                 k_shot: int = 5, n_query: int = 4, episodes_per_epoch: int = 20, pool_size: int = 64,
                 flip: bool = True, brightness: float = 0.2, shuffle: int = 256, val_batch_size: int = 64,
                 num_workers: int = 2, max_skip_fraction: float = 0.05, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.train_urls: list[str] = []
        self.val_urls: list[str] = []
        self.test_urls: list[str] = []

    def setup(self, stage: str) -> None:
        # Paths are resolved here, not in __init__, so a recipe can be built without its data.
        h = self.hparams
        if stage == "fit":
            self.train_urls = _resolve(h.train_shards, "train_shards")
        if h.val_shards and stage in ("fit", "validate"):
            self.val_urls = _resolve(h.val_shards, "val_shards")
        if stage == "test":
            spec, key = (h.test_shards, "test_shards") if h.test_shards else (h.val_shards, "val_shards")
            if not spec:
                raise UserError("data.test_shards: no test (or val) shards configured")
            self.test_urls = _resolve(spec, key)

    @property
    def micro_batch_size(self) -> int:
        """Images per training step on one rank: one episode, ``n_way * (k_shot + n_query)``."""
        h = self.hparams
        return int(h.n_way * (h.k_shot + h.n_query))

    def _source(self):
        # Called inside each DataLoader worker: its torch seed differs per worker and per epoch.
        h = self.hparams
        seed = (h.seed * 1_000_003 + torch.initial_seed()) % 2**31
        # The episode sampler decides when an epoch ends, so the stream itself is (practically) endless.
        return build_clip_pipeline(self.train_urls, shuffle=h.shuffle, resampled=True, seed=seed,
                                   epoch_length=1 << 40, frame_indices=[0],
                                   max_skip_fraction=h.max_skip_fraction, transform=first_frame_and_label)

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        episodes = EpisodeStream(self._source, image_size=h.image_size, n_way=h.n_way, k_shot=h.k_shot,
                                 n_query=h.n_query, episodes=h.episodes_per_epoch, pool_size=h.pool_size,
                                 flip=h.flip, brightness=h.brightness, seed=h.seed)
        workers = min(h.num_workers, h.episodes_per_epoch)
        # resumable: a checkpoint records how many episodes of the epoch were consumed
        return ResumableDataLoader(episodes, batch_size=None, num_workers=workers,
                                   persistent_workers=False, prefetch_factor=2 if workers else None)

    def _eval_loader(self, urls: list[str]) -> DataLoader:
        h = self.hparams
        workers = min(h.num_workers, len(urls))
        return DataLoader(_LabelledImages(urls, h.image_size, h.max_skip_fraction),
                          batch_size=h.val_batch_size, num_workers=workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_urls) if self.val_urls else []

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.test_urls)

