"""Read and write the per-frame 4D output layout (``reference.md`` section 7, :mod:`d4d.fourd.interface`).

::

    DIR/depth/NNNN.npy       float (H, W) z-depth in the units of the pose translations; <= 0 or
                             non-finite = no point (sky, invalid)
    DIR/confidence/NNNN.npy  float (H, W) per-pixel confidence, larger = surer (CUT3R: 1 + exp(x))
    DIR/color/NNNN.png       uint8 RGB (H, W, 3)
    DIR/camera/NNNN.npz      pose = (4, 4) OpenCV camera-to-world, intrinsics = (3, 3) pixel K at (H, W)
    DIR/points/NNNN.ply      optional: binary PLY of the frame's world points (x y z, red green
                             blue, confidence), written by :func:`write_frame`

``NNNN`` is the zero-padded frame index (4 digits, more when needed). The first four folders are
required and must hold the same indices; ``points/`` is for other tools (MeshLab, CloudCompare)
and is not read back. Both the viewer (:mod:`d4d.view`) and the 4D generator's exporter use this.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from d4d.utils.errors import UserError

REQUIRED = ("depth", "confidence", "color", "camera")
_SUFFIX = {"depth": ".npy", "confidence": ".npy", "color": ".png", "camera": ".npz", "points": ".ply"}
_INDEX = re.compile(r"^(\d{4,})$")


@dataclasses.dataclass
class Frame:
    """One exported frame: ``depth``, ``confidence`` float32 (H, W); ``rgb`` uint8 (H, W, 3);
    ``c2w`` float64 (4, 4) OpenCV camera-to-world; ``K`` float64 (3, 3) pixel intrinsics."""

    index: int
    depth: np.ndarray
    confidence: np.ndarray
    rgb: np.ndarray
    c2w: np.ndarray
    K: np.ndarray

    @property
    def height(self) -> int:
        return self.depth.shape[0]

    @property
    def width(self) -> int:
        return self.depth.shape[1]


def frame_name(index: int, kind: str) -> str:
    """``(3, "depth") -> "depth/0003.npy"``."""
    return f"{kind}/{index:04d}{_SUFFIX[kind]}"


def frame_indices(out_dir: str | Path) -> list[int]:
    """Sorted frame indices of ``out_dir``; UserError naming what is missing or inconsistent."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"{out_dir}: not a directory")
    missing = [k for k in REQUIRED if not (out_dir / k).is_dir()]
    if missing:
        raise UserError(f"{out_dir}: not a 4D output folder: missing {', '.join(m + '/' for m in missing)} "
                        f"(expected {', '.join(k + '/' for k in REQUIRED)} with NNNN files per frame)")
    found = {}
    for kind in REQUIRED:
        found[kind] = {int(m.group(1)) for p in (out_dir / kind).glob("*" + _SUFFIX[kind])
                       if (m := _INDEX.match(p.stem))}
    indices = set().union(*found.values())
    if not indices:
        raise UserError(f"{out_dir}: no frames (expected files such as {frame_name(0, 'depth')})")
    for kind in REQUIRED:
        lacking = sorted(indices - found[kind])
        if lacking:
            raise UserError(f"{out_dir}: {frame_name(lacking[0], kind)} is missing "
                            f"({len(lacking)} frame(s) lack {kind}/)")
    return sorted(indices)


def read_frame(out_dir: str | Path, index: int) -> Frame:
    """Load and check one frame; UserError naming the file on a bad shape or key."""
    from PIL import Image

    out_dir = Path(out_dir)
    paths = {k: out_dir / frame_name(index, k) for k in REQUIRED}
    try:
        depth = np.load(paths["depth"]).astype(np.float32)
        conf = np.load(paths["confidence"]).astype(np.float32)
        with Image.open(paths["color"]) as im:
            rgb = np.asarray(im.convert("RGB")).copy()
        with np.load(paths["camera"]) as cam:
            if "pose" not in cam or "intrinsics" not in cam:
                raise UserError(f"{paths['camera']}: needs arrays 'pose' and 'intrinsics', "
                                f"has {sorted(cam.files)}")
            c2w, K = cam["pose"].astype(np.float64), cam["intrinsics"].astype(np.float64)
    except (OSError, ValueError) as exc:
        raise UserError(f"{out_dir}: cannot read frame {index:04d}: {exc}") from None
    if depth.ndim != 2:
        raise UserError(f"{paths['depth']}: expected an (H, W) array, got shape {depth.shape}")
    for name, arr in (("confidence", conf), ("color", rgb[..., 0])):
        if arr.shape != depth.shape:
            raise UserError(f"{paths[name]}: shape {arr.shape} differs from depth {depth.shape}")
    if c2w.shape != (4, 4) or K.shape != (3, 3):
        raise UserError(f"{paths['camera']}: pose must be 4x4 and intrinsics 3x3, "
                        f"got {c2w.shape} and {K.shape}")
    return Frame(index, depth, conf, rgb, c2w, K)


def read_frames(out_dir: str | Path) -> list[Frame]:
    """All frames of ``out_dir`` in index order (see :func:`frame_indices` for the checks)."""
    return [read_frame(out_dir, i) for i in frame_indices(out_dir)]


def frame_points(frame: Frame, min_confidence: float | None = None, stride: int = 1):
    """World points of a frame: ``(points (N, 3) float32, colors (N, 3) uint8, confidence (N,))``.

    Pixels with non-finite or non-positive depth, or confidence below ``min_confidence``, are
    dropped; ``stride`` keeps every stride-th row and column. Back-projection through pixel centres
    with :func:`d4d.geometry.points.depth_to_points`.
    """
    import torch

    from d4d.geometry.points import depth_to_points

    s = max(int(stride), 1)
    depth, conf, rgb = frame.depth[::s, ::s], frame.confidence[::s, ::s], frame.rgb[::s, ::s]
    K = frame.K.copy()
    if s > 1:  # pixel (v, u) of the strided grid is the original pixel (s v, s u): centre s*v + 0.5
        K[:2] /= s
        K[:2, 2] += 0.5 - 0.5 / s
    world, _ = depth_to_points(torch.from_numpy(np.nan_to_num(depth, nan=0.0, posinf=0.0, neginf=0.0)),
                               torch.from_numpy(K).float(), torch.from_numpy(frame.c2w).float())
    keep = np.isfinite(depth) & (depth > 0) & np.isfinite(conf)
    if min_confidence is not None:
        keep &= conf >= min_confidence
    return world.numpy()[keep], rgb[keep], conf[keep]


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray,
              confidence: np.ndarray | None = None) -> None:
    """Binary little-endian PLY: float x y z, uchar red green blue[, float confidence]."""
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if confidence is not None:
        fields.append(("confidence", "<f4"))
    data = np.empty(len(points), dtype=fields)
    for i, axis in enumerate("xyz"):
        data[axis] = points[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        data[channel] = colors[:, i]
    if confidence is not None:
        data["confidence"] = confidence
    ply_type = {"<f4": "float", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(points)}",
              *(f"property {ply_type[t]} {n}" for n, t in fields), "end_header"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(data.tobytes())


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """Read a binary little-endian vertex-only PLY (as :func:`write_ply` writes) -> {property: array}."""
    ply_type = {"float": "<f4", "uchar": "u1", "double": "<f8", "int": "<i4"}
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply" or f.readline().strip() != b"format binary_little_endian 1.0":
            raise UserError(f"{path}: not a binary little-endian PLY")
        count, fields = 0, []
        while (line := f.readline().decode("ascii").split()) != ["end_header"]:
            if line[:2] == ["element", "vertex"]:
                count = int(line[2])
            elif line and line[0] == "property":
                fields.append((line[2], ply_type[line[1]]))
        data = np.frombuffer(f.read(), dtype=fields, count=count)
    return {name: data[name] for name, _ in fields}


def write_frame(out_dir: str | Path, index: int, depth, confidence, rgb, c2w, K, points: bool = True) -> None:
    """Write one frame in the layout above (and ``points/NNNN.ply`` of its valid pixels if ``points``).

    Arrays as in :class:`Frame` (numpy or torch, any float dtype; ``rgb`` uint8 or [0, 1] float).
    """
    from PIL import Image

    out_dir = Path(out_dir)
    arr = lambda x: x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)  # noqa: E731
    depth, confidence, rgb, c2w, K = map(arr, (depth, confidence, rgb, c2w, K))
    if rgb.dtype != np.uint8:
        rgb = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    for kind in ("depth", "confidence", "color", "camera"):
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
    np.save(out_dir / frame_name(index, "depth"), depth.astype(np.float32))
    np.save(out_dir / frame_name(index, "confidence"), confidence.astype(np.float32))
    Image.fromarray(rgb).save(out_dir / frame_name(index, "color"))
    np.savez(out_dir / frame_name(index, "camera"), pose=c2w.astype(np.float64),
             intrinsics=K.astype(np.float64))
    if points:
        frame = Frame(index, depth.astype(np.float32), confidence.astype(np.float32), rgb,
                      c2w.astype(np.float64), K.astype(np.float64))
        write_ply(out_dir / frame_name(index, "points"), *frame_points(frame))
