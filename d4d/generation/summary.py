"""The summary picture of one ``d4d.generate`` run (matplotlib, Agg): the input image, the chosen
camera path drawn in 3D (requested and pose-corrected cameras), evenly spaced generated frames, and
the 4D scene rendered from a pulled-back viewpoint (:func:`d4d.fourd.viz.overview_camera`) at
several times."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

Tensor = torch.Tensor


def _draw_path(ax, c2w: Tensor, colour: str, label: str, scale: float) -> None:
    pos = c2w[:, :3, 3].double().numpy()
    fwd = c2w[:, :3, 2].double().numpy() * scale
    # plot x (right), z (forward), -y (up) so that the picture stands upright (OpenCV y points down)
    ax.plot(pos[:, 0], pos[:, 2], -pos[:, 1], "-o", ms=2, color=colour, label=label)
    ax.quiver(pos[:, 0], pos[:, 2], -pos[:, 1], fwd[:, 0], fwd[:, 2], -fwd[:, 1], color=colour, linewidth=0.6)


@torch.no_grad()
def summary_figure(
    image: Tensor,
    frames: Tensor,
    requested_c2w: Tensor,
    scene,
    motion: str,
    probabilities: dict[str, float] | None = None,
    times=(0.0, 0.5, 1.0),
    max_frames: int = 5,
):
    """``image (3, H, W)`` and ``frames (F, 3, H, W)`` in [0, 1]; ``requested_c2w (F, 4, 4)`` OpenCV;
    ``scene`` a :class:`~d4d.fourd.interface.Scene4D`. Returns the figure (caller saves and closes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from d4d.fourd.viz import overview_camera

    n = frames.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(max_frames, n)).round().astype(int))
    cols = max(len(picks), len(times) + 2)
    fig = plt.figure(figsize=(2.3 * cols, 5.0))
    ax = fig.add_subplot(2, cols, 1)
    ax.imshow(image.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
    title = f"input; motion: {motion}"
    if probabilities:
        title += f" (p={probabilities.get(motion, float('nan')):.2f})"
    ax.set_title(title, fontsize=8)
    ax.axis("off")

    ax = fig.add_subplot(2, cols, 2, projection="3d")
    cams = scene.cameras_c2w.detach().float().cpu()
    both = torch.cat([requested_c2w.float().cpu(), cams])
    span = float((both[:, :3, 3] - both[:1, :3, 3]).norm(dim=-1).max())
    scale = max(span, 1e-3) * 0.3  # arrows (camera +z) a third of the path's extent
    _draw_path(ax, requested_c2w.float().cpu(), "tab:blue", "requested", scale)
    _draw_path(ax, cams, "tab:orange", "corrected", scale)
    ax.set_xlabel("x", fontsize=7)
    ax.set_ylabel("z", fontsize=7)
    ax.set_zlabel("up", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, loc="upper left")
    ax.set_title("camera path (3D)", fontsize=8)

    xyz, _, _ = scene.points_at(0.0)
    view = overview_camera(xyz.detach().float().cpu(), cams[0])
    h, w = scene.height, scene.width
    K = scene.K.detach().float().cpu().clone()
    K[:2] *= 2
    for k, t in enumerate(times):
        rgb, _, alpha = scene.render(view, K, 2 * h, 2 * w, float(t))
        img = (rgb * alpha + (1 - alpha) * 0.15).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        ax = fig.add_subplot(2, cols, 3 + k)
        ax.imshow(img)
        ax.set_title(f"4D scene at t={t:.2f}", fontsize=8)
        ax.axis("off")

    for k, i in enumerate(picks):
        ax = fig.add_subplot(2, cols, cols + 1 + k)
        ax.imshow(frames[i].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy())
        ax.set_title(f"frame {i}", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_summary(path: str | Path, *args, **kwargs) -> Path:
    """:func:`summary_figure` written to ``path`` (PNG, 100 dpi)."""
    from d4d.fourd.viz import save_figure

    return save_figure(summary_figure(*args, **kwargs), path)
