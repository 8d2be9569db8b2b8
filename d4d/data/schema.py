"""The one sample schema every shard writer and reader in d4d uses.

A sample is one clip of ``T >= 1`` frames (a still image is a clip with ``T = 1``). In a WebDataset
tar a sample is the group of files sharing a key ``<key>.<field>``; keys contain no dots.

========================  ==========================  ==============================================
field (file suffix)       decoded type, shape          meaning and convention
========================  ==========================  ==============================================
``frames.mp4``            uint8 ``(T, H, W, 3)``       RGB frames, H.264 (decoded with decord or PyAV).
  or ``frames.npy``       uint8 ``(T, H, W, 3)``       lossless alternative.
  or ``image.jpg``        uint8 ``(1, H, W, 3)``       a still image (COCO, AIGC images).
``c2w.npy``               float32 ``(T, 4, 4)``        OpenCV camera-to-world (x right, y down,
                                                       z forward). Optional for still images.
``intrinsics.npy``        float32 ``(T, 3, 3)``        pixel intrinsics *at the stored H x W*.
                                                       Required whenever ``c2w.npy`` is present.
``depth.npy``             float16/32 ``(T, H, W)``     z-depth along the optical axis, in the units
                                                       of ``c2w`` translations; 0 = invalid. Optional.
``mask.npy``              uint8 ``(T, H, W)``          1 where a moving object is. Optional.
``meta.json``             dict                         see :data:`META_KEYS`.
========================  ==========================  ==============================================

``meta.json`` keys (all optional except ``dataset``): ``dataset`` (str: ``synthetic``,
``realestate10k``, ``coco``, ``images``), ``clip_id`` (str), ``motion`` (one of
:data:`d4d.geometry.motions.MOTIONS` or null), ``motion_confidence`` (float in [0, 1]),
``caption`` (str), ``captions`` (list of str), ``fps`` (float), ``timestamps_us`` (list of int, T),
``metric_depth`` (bool: depth and translations are metric), ``split`` (str), ``scene_seed`` (int),
``dynamic`` (bool: the scene has moving content).

:class:`ClipSample` is the validated, decoded form; :meth:`ClipSample.from_raw` checks a decoded
sample once (shapes agree, poses finite and rigid, intrinsics sane) and raises
:class:`SampleError` naming the key and field otherwise.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from d4d.geometry.motions import MOTIONS

FRAME_FIELDS = ("frames.mp4", "frames.npy", "image.jpg")
ARRAY_FIELDS = ("c2w.npy", "intrinsics.npy", "depth.npy", "mask.npy")
META_KEYS = (
    "dataset", "clip_id", "motion", "motion_confidence", "caption", "captions", "fps",
    "timestamps_us", "metric_depth", "split", "scene_seed", "dynamic",
)


class SampleError(ValueError):
    """A sample that violates the schema. The message names the sample key and the field."""


@dataclasses.dataclass
class ClipSample:
    """A decoded, validated sample. Tensors are torch, on CPU.

    Attributes:
        key: the sample key (``__key__``).
        frames: uint8 ``(T, H, W, 3)`` RGB.
        c2w: float32 ``(T, 4, 4)`` OpenCV camera-to-world, or None (still images without a camera).
        K: float32 ``(T, 3, 3)`` pixel intrinsics at ``(H, W)``, or None.
        depth: float32 ``(T, H, W)`` z-depth (0 = invalid), or None.
        mask: bool ``(T, H, W)`` moving-object mask, or None.
        meta: the ``meta.json`` dictionary.
        shard: the shard url the sample came from (for error reports), if known.
    """

    key: str
    frames: torch.Tensor
    c2w: torch.Tensor | None = None
    K: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    shard: str | None = None

    # ----------------------------------------------------------------------------------- derived
    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the stored frames."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    @property
    def motion(self) -> str | None:
        return self.meta.get("motion")

    @property
    def motion_index(self) -> int:
        """Class id of the motion label in :data:`MOTIONS`, or -1 when unlabelled."""
        m = self.motion
        return MOTIONS.index(m) if m in MOTIONS else -1

    @property
    def caption(self) -> str:
        cap = self.meta.get("caption")
        if cap:
            return str(cap)
        caps = self.meta.get("captions") or []
        return str(caps[0]) if caps else ""

    def relative_c2w(self, reference: int = 0) -> torch.Tensor:
        """``(T, 4, 4)`` poses with frame ``reference`` the identity: ``inv(c2w_ref) @ c2w_i``."""
        if self.c2w is None:
            raise SampleError(f"sample {self.key!r}: no c2w.npy, so no relative poses")
        ref = torch.linalg.inv(self.c2w[reference].double())
        return (ref @ self.c2w.double()).float()

    def frames_float(self) -> torch.Tensor:
        """float32 ``(T, 3, H, W)`` in [0, 1]."""
        return self.frames.permute(0, 3, 1, 2).float().div_(255.0)

    # ------------------------------------------------------------------------------- validation
    @classmethod
    def from_raw(cls, raw: dict[str, Any]) -> "ClipSample":
        """Validate a decoded WebDataset sample (``{"__key__": ..., "frames.mp4": array, ...}``).

        Frame fields must already be decoded to uint8 arrays ``(T, H, W, 3)`` (``image.jpg`` may be
        ``(H, W, 3)``), ``.npy`` fields to arrays and ``meta.json`` to a dict.
        """
        key = str(raw.get("__key__", "?"))
        shard = raw.get("__url__")

        def fail(field: str, why: str) -> SampleError:
            where = f" in {shard}" if shard else ""
            return SampleError(f"sample {key!r}{where}: field {field!r} {why}")

        present = [f for f in FRAME_FIELDS if f in raw]
        if len(present) != 1:
            raise fail("frames", f"needs exactly one of {FRAME_FIELDS}, found {present or 'none'}")
        field = present[0]
        frames = np.asarray(raw[field])
        if field == "image.jpg" and frames.ndim == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise fail(field, f"must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
        T, H, W = frames.shape[:3]
        if T < 1 or H < 1 or W < 1:
            raise fail(field, f"is empty: shape {frames.shape}")

        def array(name: str, shape: tuple[int, ...]) -> np.ndarray | None:
            if name not in raw:
                return None
            arr = np.asarray(raw[name])
            if arr.shape != shape:
                raise fail(name, f"must have shape {shape} to match {T} frames of {H}x{W}, got {arr.shape}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise fail(name, "has non-finite values")
            return arr

        c2w = array("c2w.npy", (T, 4, 4))
        K = array("intrinsics.npy", (T, 3, 3))
        depth = array("depth.npy", (T, H, W))
        mask = array("mask.npy", (T, H, W))
        if (c2w is None) != (K is None):
            raise fail("intrinsics.npy" if K is None else "c2w.npy", "is missing: c2w.npy and intrinsics.npy come together")
        if c2w is not None:
            bottom = c2w[:, 3, :]
            if not np.allclose(bottom, [0, 0, 0, 1], atol=1e-5):
                raise fail("c2w.npy", "last row must be [0, 0, 0, 1]")
            R = c2w[:, :3, :3].astype(np.float64)
            ortho = np.abs(R @ np.swapaxes(R, 1, 2) - np.eye(3)).max()
            if ortho > 1e-3 or (np.linalg.det(R) <= 0).any():
                raise fail("c2w.npy", f"rotation is not a proper rotation (orthogonality error {ortho:.2e})")
        if K is not None:
            if (K[:, 0, 0] <= 0).any() or (K[:, 1, 1] <= 0).any():
                raise fail("intrinsics.npy", "focal lengths must be > 0")
            if not np.allclose(K[:, 2, :], [0, 0, 1], atol=1e-6) or not np.allclose(K[:, 1, 0], 0):
                raise fail("intrinsics.npy", "must be [[fx, s, cx], [0, fy, cy], [0, 0, 1]]")
        if depth is not None and (depth < 0).any():
            raise fail("depth.npy", "has negative depth (0 marks invalid pixels)")
        meta = raw.get("meta.json", {})
        if not isinstance(meta, dict):
            raise fail("meta.json", f"must be a JSON object, got {type(meta).__name__}")
        motion = meta.get("motion")
        if motion is not None and motion not in MOTIONS:
            raise fail("meta.json", f"motion {motion!r} is not one of {', '.join(MOTIONS)}")
        ts = meta.get("timestamps_us")
        if ts is not None and len(ts) != T:
            raise fail("meta.json", f"timestamps_us has {len(ts)} entries for {T} frames")

        def tensor(a: np.ndarray | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
            if a is None:
                return None
            # torch must not wrap read-only buffers (e.g. np.asarray of a PIL image): copy those
            a = np.ascontiguousarray(a) if a.flags.writeable else np.array(a, order="C")
            t = torch.from_numpy(a)
            return t if dtype is None else t.to(dtype)

        return cls(
            key=key,
            frames=tensor(frames),
            c2w=tensor(c2w, torch.float32),
            K=tensor(K, torch.float32),
            depth=tensor(depth, torch.float32),
            mask=tensor(mask, torch.bool),
            meta=dict(meta),
            shard=shard,
        )
