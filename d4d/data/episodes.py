"""Images for the camera-motion classifier, and episodic few-shot sampling from a shard stream.

An *episode* (paper, Table 3) samples ``n_way`` classes, then ``k_shot`` support and ``n_query``
query images per class. Episodes are drawn from per-class pools that are refilled from a
(resampled, shuffled) shard stream, so the sampler streams: it never needs the whole dataset in
memory, and a small few-shot set is simply revisited.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from d4d.geometry.motions import MOTIONS
from d4d.models.motion_classifier import IMAGENET_MEAN, IMAGENET_STD

# A horizontal flip mirrors the scene, so a turn to the left becomes a turn to the right.
FLIP_LABEL = {MOTIONS.index("turn_left"): MOTIONS.index("turn_right"),
              MOTIONS.index("turn_right"): MOTIONS.index("turn_left")}


def to_model_input(image: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` or ``(B, H, W, 3)`` RGB -> float ``(…, 3, size, size)`` normalised.

    The image is resized (bilinear, antialiased) to a square without cropping: the motion rule may
    depend on what is at the borders, so nothing is cut away.
    """
    batched = image.dim() == 4
    x = image if batched else image[None]
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - m) / s
    return x if batched else x[0]


def first_frame_and_label(sample) -> tuple[torch.Tensor, int]:
    """ClipSample -> (uint8 ``(H, W, 3)`` first frame, motion class id or -1)."""
    return sample.frames[0], sample.motion_index


class EpisodeStream(IterableDataset):
    """Yields ``episodes`` episodes per epoch (split across DataLoader workers), each a dict:

    * ``images``: float ``(n_way * (k_shot + n_query), 3, S, S)``, class-major, support first;
    * ``labels``: long ``(N,)`` global class ids in :data:`MOTIONS` order;
    * ``is_query``: bool ``(N,)``.

    Args:
        source: an iterable of ``(uint8 (H, W, 3) image, class id)``; ids < 0 are ignored. It is
            iterated as an endless stream (wrap finite sources in a resampled pipeline).
        pool_size: images kept per class (reservoir); ``refresh`` new stream items enter the pools
            before each episode.
        flip: random horizontal flips, swapping turn_left and turn_right labels.
        brightness: random brightness factor range ``1 +- brightness``.
    """

    def __init__(self, source: Callable[[], Iterable[tuple[torch.Tensor, int]]], *, image_size: int,
                 n_way: int = 8, k_shot: int = 5, n_query: int = 4, episodes: int = 20,
                 num_classes: int = len(MOTIONS), pool_size: int = 64, refresh: int | None = None,
                 flip: bool = True, brightness: float = 0.2, seed: int = 0):
        super().__init__()
        if not 1 <= n_way <= num_classes:
            raise ValueError(f"n_way must be in [1, {num_classes}], got {n_way}")
        if pool_size < k_shot + n_query:
            raise ValueError(f"pool_size {pool_size} < k_shot + n_query = {k_shot + n_query}")
        self.source = source
        self.image_size, self.n_way, self.k_shot, self.n_query = image_size, n_way, k_shot, n_query
        self.episodes, self.num_classes, self.pool_size = episodes, num_classes, pool_size
        self.refresh = refresh if refresh is not None else n_way * (k_shot + n_query)
        self.flip, self.brightness, self.seed = flip, brightness, seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.episodes

    def _share(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return wid, len(range(wid, self.episodes, nw))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        wid, count = self._share()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # torch.initial_seed() differs per worker and per epoch (the DataLoader draws a new base seed
        # from the main process's generator each time it starts workers), and is reproducible under
        # seed_everything; self.epoch covers the in-process (num_workers=0) case.
        rng = random.Random(hash((self.seed, self.epoch, torch.initial_seed(), rank, wid)) & 0xFFFFFFFF)
        self.epoch += 1
        stream = iter(self.source())
        pools: list[list[torch.Tensor]] = [[] for _ in range(self.num_classes)]
        seen = [0] * self.num_classes

        def add(n: int) -> None:
            added = 0
            while added < n:
                try:
                    image, label = next(stream)
                except StopIteration as exc:
                    raise RuntimeError("the episode source ended; use a resampled shard stream") from exc
                if not 0 <= label < self.num_classes:
                    continue
                seen[label] += 1
                pool = pools[label]
                if len(pool) < self.pool_size:
                    pool.append(image)
                else:  # reservoir sampling keeps a uniform sample of everything seen
                    j = rng.randrange(seen[label])
                    if j < self.pool_size:
                        pool[j] = image
                added += 1

        need = self.k_shot + self.n_query
        for _ in range(count):
            add(self.refresh)
            guard = 0
            while sum(len(p) >= need for p in pools) < self.n_way:
                add(self.refresh)
                guard += 1
                if guard > 10_000:
                    raise RuntimeError(f"fewer than {self.n_way} classes have {need} images in the stream")
            yield self._episode(pools, rng, need)

    def _episode(self, pools, rng: random.Random, need: int) -> dict[str, torch.Tensor]:
        ready = [c for c, p in enumerate(pools) if len(p) >= need]
        classes = sorted(rng.sample(ready, self.n_way))
        images, labels, is_query = [], [], []
        for c in classes:
            picks = rng.sample(range(len(pools[c])), need)
            for i, idx in enumerate(picks):
                image, label = pools[c][idx], c
                if self.flip and rng.random() < 0.5:
                    image, label = image.flip(1), FLIP_LABEL.get(c, c)
                images.append(image)
                labels.append(label)
                is_query.append(i >= self.k_shot)
        x = to_model_input(torch.stack(images), self.image_size)
        if self.brightness > 0:
            gains = torch.tensor([1 + rng.uniform(-self.brightness, self.brightness) for _ in images])
            x = x * gains.view(-1, 1, 1, 1) + (gains.view(-1, 1, 1, 1) - 1) * _mean_over_std()
        return {"images": x, "labels": torch.tensor(labels), "is_query": torch.tensor(is_query)}


def _mean_over_std() -> torch.Tensor:
    # Brightness scales the [0, 1] image: (g*x - m)/s = g*(x - m)/s + (g - 1)*m/s.
    return (torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
