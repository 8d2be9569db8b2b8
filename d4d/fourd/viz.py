"""Pictures of point clouds: a splatted render from a viewpoint pulled back from the first camera,
next to the input frames (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path

import torch

from d4d.fourd.render import splat

Tensor = torch.Tensor


def overview_camera(points: Tensor, c2w0: Tensor, pull_back: float = 0.6, raise_up: float = 0.25) -> Tensor:
    """A camera behind and above ``c2w0`` (by fractions of the median point depth), looking at the
    median point. Returns ``(4, 4)`` OpenCV c2w."""
    centre = points.median(0).values
    eye0 = c2w0[:3, 3]
    depth = (centre - eye0).norm().clamp_min(1e-3)
    eye = eye0 - c2w0[:3, 2] * pull_back * depth - c2w0[:3, 1] * raise_up * depth
    fwd = torch.nn.functional.normalize(centre - eye, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(fwd, c2w0[:3, 1]), dim=0)
    if torch.dot(right, c2w0[:3, 0]) < 0:
        right = -right
    down = torch.linalg.cross(fwd, right)
    out = torch.eye(4, dtype=points.dtype)
    out[:3, 0], out[:3, 1], out[:3, 2], out[:3, 3] = right, down, fwd, eye
    return out


@torch.no_grad()
def point_cloud_figure(points: Tensor, colors: Tensor, K: Tensor, height: int, width: int,
                       frames: Tensor | None = None, c2w0: Tensor | None = None, title: str = ""):
    """A matplotlib figure: input frames (first/last, if given) and the cloud rendered from
    :func:`overview_camera`. ``points (N, 3)``, ``colors (N, 3)`` in [0, 1], ``K`` at (height, width)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, colors = points.detach().float().cpu(), colors.detach().float().cpu()
    c2w0 = torch.eye(4) if c2w0 is None else c2w0.detach().float().cpu()
    cam = overview_camera(points, c2w0)
    depth = (points - cam[:3, 3]).norm(dim=-1)
    radius = depth / K[0, 0].float() * 1.2
    big_h, big_w = height * 2, width * 2
    big_K = K.float().cpu().clone()
    big_K[:2] *= 2
    rgb, _, alpha = splat(points, colors, radius * 0.5, cam, big_K, big_h, big_w, window=3)
    img = (rgb * alpha + (1 - alpha) * 0.15).clamp(0, 1).permute(1, 2, 0).numpy()
    panels = [] if frames is None else [frames[0], frames[-1]]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 2), 3.4))
    axes = list(axes) if len(panels) else [axes]
    for ax, fr, name in zip(axes, panels, ("first frame", "last frame")):
        ax.imshow(fr.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
        ax.set_title(name)
    axes[-1].imshow(img)
    axes[-1].set_title("point cloud (pulled-back view)")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
