"""Writing what the video stages generate: mp4, PNG frames, the camera path (RealEstate10K + JSON),
and a picture of frames beside their camera path (validation logs, docs).

Layout of :func:`write_video_outputs` in ``out_dir``: ``video.mp4``, ``frames/frame_0000.png ...``,
``cameras.txt`` (RealEstate10K: URL line, then ``timestamp_us fx/W fy/H cx/W cy/H 0 0`` + row-major
3x4 OpenCV world-to-camera), ``cameras.json`` (``c2w`` OpenCV camera-to-world, pixel ``K``,
``height``, ``width``, ``label``), ``info.json`` (the result's info) and ``preview.png``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from d4d.data.video import encode_mp4
from d4d.geometry.cameras import RealEstateCameras, invert_se3, write_realestate_cameras
from d4d.video.interface import CameraPath, VideoResult


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """``(F, 3, H, W)`` float [0, 1] -> uint8 ``(F, H, W, 3)``."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_camera_json(path: str | Path, camera: CameraPath) -> None:
    Path(path).write_text(json.dumps({
        "c2w": camera.c2w.double().tolist(), "K": camera.K.double().tolist(),
        "height": camera.height, "width": camera.width, "label": camera.label,
        "convention": "OpenCV camera-to-world (x right, y down, z forward), frame 0 the identity; pixel K",
    }, indent=1))


def write_camera_realestate(path: str | Path, camera: CameraPath, fps: float = 8.0) -> None:
    n = camera.num_frames
    K = camera.K.double()
    norm = torch.tensor([K[0, 0] / camera.width, K[1, 1] / camera.height, K[0, 2] / camera.width,
                         K[1, 2] / camera.height], dtype=torch.float64).repeat(n, 1)
    stamps = torch.round(torch.arange(n, dtype=torch.float64) * 1e6 / fps).long()
    write_realestate_cameras(path, RealEstateCameras(f"d4d:{camera.label or 'generated'}", stamps, norm,
                                                     invert_se3(camera.c2w.double()), camera.c2w.double()))


def video_path_figure(frames: torch.Tensor, c2w: torch.Tensor, title: str = "", max_frames: int = 6):
    """Matplotlib figure: up to ``max_frames`` evenly spaced frames beside the top-down (x-z) camera path.

    frames: ``(F, 3, H, W)`` in [0, 1]; c2w: ``(F, 4, 4)`` OpenCV (the arrows show each camera's +z).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = frames.shape[0]
    picks = np.unique(np.linspace(0, n - 1, min(max_frames, n)).round().astype(int))
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(2.2 * (len(picks) + 1), 2.6))
    images = to_uint8(frames)
    for ax, i in zip(axes[:-1], picks):
        ax.imshow(images[i])
        ax.set_title(f"frame {i}", fontsize=8)
        ax.axis("off")
    ax = axes[-1]
    pos = c2w[:, :3, 3].double().cpu().numpy()
    fwd = c2w[:, :3, 2].double().cpu().numpy()
    span = max(1e-6, float(np.abs(pos[:, [0, 2]]).max()))
    ax.plot(pos[:, 0], pos[:, 2], "-o", ms=2, color="tab:blue")
    ax.quiver(pos[:, 0], pos[:, 2], fwd[:, 0], fwd[:, 2], angles="xy", scale_units="xy",
              scale=2.5 / max(span, 0.4), width=0.01, color="tab:orange")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("x (right)", fontsize=8)
    ax.set_ylabel("z (forward)", fontsize=8)
    ax.set_title("camera path (top view)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_video_outputs(result: VideoResult, out_dir: str | Path, fps: float = 8.0) -> dict[str, Path]:
    """Write ``result`` to ``out_dir`` (module docstring); returns the written paths by kind."""
    from PIL import Image

    out = Path(out_dir)
    (out / "frames").mkdir(parents=True, exist_ok=True)
    images = to_uint8(result.frames)
    paths = {"video": out / "video.mp4", "frames": out / "frames", "cameras_txt": out / "cameras.txt",
             "cameras_json": out / "cameras.json", "info": out / "info.json", "preview": out / "preview.png"}
    h, w = images.shape[1:3]
    even = images[:, : h - h % 2, : w - w % 2]  # H.264 yuv420p needs even sizes
    paths["video"].write_bytes(encode_mp4(even, fps=fps, qp=18))
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / "frames" / f"frame_{i:04d}.png")
    write_camera_realestate(paths["cameras_txt"], result.camera, fps)
    write_camera_json(paths["cameras_json"], result.camera)
    paths["info"].write_text(json.dumps(result.info, indent=1, default=str))
    fig = video_path_figure(result.frames, result.camera.c2w, title=result.camera.label)
    fig.savefig(paths["preview"], dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths
