"""Report picture of an evaluation's sample videos: the real clip and each protocol's frames.

``python -m d4d.evaluate`` writes ``<out>/samples/<protocol>/<clip>.mp4`` (real | generated side by
side, ``+`` in protocol names written ``_``). For the first clip that every protocol has, the picture
shows one row per protocol (the real frames on top), frames left to right, so a reader sees what
the numbers of Table 1 / Table 2 measured.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def sample_clip(samples_dir: Path) -> tuple[str, dict[str, Path]] | None:
    """``(clip id, {protocol folder: mp4})`` of the first clip (sorted) present for every protocol."""
    folders = sorted(p for p in samples_dir.iterdir() if p.is_dir()) if samples_dir.is_dir() else []
    if not folders:
        return None
    common = set.intersection(*({f.stem for f in d.glob("*.mp4")} for d in folders))
    if not common:
        return None
    clip = sorted(common)[0]
    return clip, {d.name: d / f"{clip}.mp4" for d in folders}


def samples_figure(samples_dir: Path, path: Path, title: str = "", max_frames: int = 8) -> Path | None:
    """Write the picture to ``path`` (PNG); None when there is no sample video."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from d4d.data.video import decode_mp4

    found = sample_clip(Path(samples_dir))
    if found is None:
        return None
    clip, videos = found
    order = sorted(videos, key=lambda n: (n.replace("_4d", ""), n.endswith("_4d")))  # X then X+4d
    rows, names = [], []
    for name in order:
        video = decode_mp4(videos[name].read_bytes())  # (F, H, 2W, 3): real | generated
        w = video.shape[2] // 2
        if not rows:
            rows.append(video[:max_frames, :, :w])
            names.append("real")
        rows.append(video[:max_frames, :, w: 2 * w])
        names.append(name.replace("_4d", "+4d"))
    n = min(r.shape[0] for r in rows)
    h, w = rows[0].shape[1:3]
    scale = max(1.0, 96 / h)  # small clips drawn at least 96 px tall
    fig, axes = plt.subplots(len(rows), 1, figsize=(n * w * scale / 80 + 1.2, len(rows) * h * scale / 80 * 1.08 + 0.6),
                             squeeze=False)
    for k, (ax, name, frames) in enumerate(zip(axes[:, 0], names, rows)):
        ax.imshow(np.concatenate(list(frames[:n]), axis=1), interpolation="nearest")
        last = k == len(rows) - 1
        ax.set_xticks([(i + 0.5) * w for i in range(n)] if last else [], [str(i) for i in range(n)] if last else [],
                      fontsize=7)
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    axes[-1, 0].set_xlabel("frame (0 = the input image)", fontsize=8)
    fig.suptitle(f"{title + ': ' if title else ''}clip {clip}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
