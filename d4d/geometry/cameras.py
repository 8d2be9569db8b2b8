"""Camera conventions, pose algebra, RealEstate10K camera files and intrinsics under resize/crop.

Conventions used by all of :mod:`d4d.geometry` (``../shared/docs/reference.md`` section 1):

* Camera axes are OpenCV: x right, y down, z forward. Poses are stored as ``c2w: (..., 4, 4)``
  camera-to-world; ``w2c`` is its inverse. OpenGL/Blender poses are converted at the border with
  :func:`opengl_to_opencv`.
* Pixel intrinsics ``K: (..., 3, 3)`` are given at the resolution of the tensor they describe and
  map camera points to *continuous* pixel coordinates: pixel ``(row v, column u)`` covers
  ``[u, u + 1) x [v, v + 1)``, so its centre is ``(u + 0.5, v + 0.5)`` and the image centre of a
  ``W``-wide image is ``x = W / 2``. In this frame a resize by ``s`` maps ``x -> s * x`` exactly
  (the sampling of ``torch.nn.functional.interpolate(..., align_corners=False)``) and a crop
  starting at column ``left`` maps ``x -> x - left``; that is why the resize/crop helpers below
  are exact and not off by half a pixel.
* Normalised intrinsics ``(fx / W, fy / H, cx / W, cy / H)`` are RealEstate10K's; they describe the
  same camera at every resolution with the same aspect ratio.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from d4d.geometry.precision import full_precision

Tensor = torch.Tensor

_OPENGL_FLIP = (1.0, -1.0, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Pose algebra
# ---------------------------------------------------------------------------------------------

@full_precision
def invert_se3(pose: Tensor) -> Tensor:
    """Inverse of rigid transforms, e.g. ``w2c -> c2w`` or ``c2w -> w2c``.

    Args:
        pose: ``(..., 4, 4)`` rigid transforms ``[R t; 0 1]`` with ``R`` a rotation.

    Returns:
        ``(..., 4, 4)`` ``[R^T, -R^T t; 0 1]``, same dtype. Uses the transpose rather than a
        general inverse: exact for rotations and well conditioned in float32.
    """
    rot = pose[..., :3, :3]
    trans = pose[..., :3, 3:]
    rot_t = rot.transpose(-1, -2)
    out = torch.zeros_like(pose)
    out[..., :3, :3] = rot_t
    out[..., :3, 3:] = -rot_t @ trans
    out[..., 3, 3] = 1.0
    return out


@full_precision
def make_pose(rotation: Tensor, translation: Tensor) -> Tensor:
    """``(..., 3, 3)`` rotation and ``(..., 3)`` translation -> ``(..., 4, 4)`` homogeneous pose."""
    batch = torch.broadcast_shapes(rotation.shape[:-2], translation.shape[:-1])
    out = torch.zeros(*batch, 4, 4, dtype=rotation.dtype, device=rotation.device)
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


@full_precision
def rotation_vector(rotation: Tensor) -> Tensor:
    """Axis-angle (log map) of rotations: ``(..., 3, 3)`` -> ``(..., 3)``, angle in radians.

    The vector is ``angle * axis`` with ``angle`` in ``[0, pi]``, expressed in the frame the
    rotation acts in (for a relative camera rotation: the camera's own axes, so component 0 is
    pitch about x, 1 yaw about y, 2 roll about z).
    """
    r = rotation
    skew = torch.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    two_sin = skew.norm(dim=-1)
    two_cos = r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0
    angle = torch.atan2(two_sin, two_cos)
    # angle / (2 sin angle) -> 1/2 as angle -> 0; guard the division there.
    factor = torch.where(two_sin > 1e-12, angle / two_sin.clamp_min(1e-12), torch.full_like(angle, 0.5))
    vec = skew * factor[..., None]
    # Near pi the skew part vanishes; read the axis from the symmetric part (R + I) / 2 = a a^T.
    near_pi = two_cos < -2.0 + 1e-6
    if near_pi.any():
        sym = (r + torch.eye(3, dtype=r.dtype, device=r.device)) / 2
        diag = sym.diagonal(dim1=-2, dim2=-1)
        col = diag.argmax(-1, keepdim=True)
        axis = torch.gather(sym, -1, col[..., None, :].expand(*sym.shape[:-1], 1)).squeeze(-1)
        axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        vec = torch.where(near_pi[..., None], axis * angle[..., None], vec)
    return vec


def opengl_to_opencv(c2w: Tensor) -> Tensor:
    """Convert ``c2w: (..., 4, 4)`` between OpenGL/Blender (x right, y up, z back) and OpenCV.

    Flips the y and z columns (the camera axes), leaving the world frame and the camera centre
    alone. The map is its own inverse, so it also converts OpenCV -> OpenGL.
    """
    flip = c2w.new_tensor(_OPENGL_FLIP)
    return c2w * flip


opencv_to_opengl = opengl_to_opencv


@full_precision
def relative_poses(
    c2w: Tensor,
    reference: int | Tensor = 0,
    translation_scale: float | Tensor = 1.0,
) -> Tensor:
    """Poses relative to a reference frame: ``inv(c2w[ref]) @ c2w[i]``.

    The reference camera becomes the identity, i.e. the world frame becomes the reference
    camera's frame (CameraCtrl uses frame 0; CamI2V the conditioning frame, then multiplies the
    translations by its ``trace_scale_factor``).

    Args:
        c2w: ``(..., T, 4, 4)`` OpenCV camera-to-world.
        reference: frame index, or a ``(...,)`` integer tensor with one index per batch element.
        translation_scale: multiplies the relative translations (a float or a ``(...,)`` tensor).

    Returns:
        ``(..., T, 4, 4)`` relative camera-to-world, ``out[..., ref, :, :]`` the identity.
    """
    if isinstance(reference, int):
        ref = c2w[..., reference, :, :].unsqueeze(-3)
    else:
        index = reference.to(torch.long).reshape(*reference.shape, 1, 1, 1).expand(*reference.shape, 1, 4, 4)
        ref = torch.gather(c2w, -3, index)
    rel = invert_se3(ref) @ c2w
    if not (isinstance(translation_scale, (int, float)) and translation_scale == 1.0):
        scale = torch.as_tensor(translation_scale, dtype=c2w.dtype, device=c2w.device)
        rel = rel.clone()
        rel[..., :3, 3] = rel[..., :3, 3] * scale.reshape(*scale.shape, 1, 1)
    return rel


# ---------------------------------------------------------------------------------------------
# Intrinsics
# ---------------------------------------------------------------------------------------------

def intrinsics_matrix(fx: Tensor | float, fy: Tensor | float, cx: Tensor | float, cy: Tensor | float) -> Tensor:
    """Pixel intrinsics ``(..., 3, 3)`` from broadcastable ``fx, fy, cx, cy`` (pixels)."""
    fx, fy, cx, cy = torch.broadcast_tensors(*(torch.as_tensor(v) for v in (fx, fy, cx, cy)))
    dtype = fx.dtype if fx.is_floating_point() else torch.get_default_dtype()
    zero, one = torch.zeros_like(fx, dtype=dtype), torch.ones_like(fx, dtype=dtype)
    rows = [fx, zero, cx, zero, fy, cy, zero, zero, one]
    return torch.stack([r.to(dtype) for r in rows], -1).reshape(*fx.shape, 3, 3)


def normalized_to_pixel_intrinsics(intrinsics: Tensor, height: int, width: int) -> Tensor:
    """RealEstate10K normalised intrinsics -> pixel ``K``.

    Args:
        intrinsics: ``(..., 4)`` ``(fx / W, fy / H, cx / W, cy / H)``.
        height, width: the image size ``H, W`` in pixels that ``K`` will describe.

    Returns:
        ``(..., 3, 3)`` pixel intrinsics in continuous pixel coordinates (module docstring).
    """
    fx, fy, cx, cy = intrinsics.unbind(-1)
    return intrinsics_matrix(fx * width, fy * height, cx * width, cy * height)


def pixel_to_normalized_intrinsics(K: Tensor, height: int, width: int) -> Tensor:
    """Pixel ``K: (..., 3, 3)`` at ``(H, W)`` -> ``(..., 4)`` ``(fx / W, fy / H, cx / W, cy / H)``."""
    return torch.stack(
        [K[..., 0, 0] / width, K[..., 1, 1] / height, K[..., 0, 2] / width, K[..., 1, 2] / height], -1
    )


def scale_intrinsics(K: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """``K: (..., 3, 3)`` after scaling the image by ``scale_x`` horizontally, ``scale_y`` vertically.

    In continuous pixel coordinates a resize is ``x -> scale_x * x``, so fx and cx scale by
    ``scale_x``, fy and cy by ``scale_y`` (different when the aspect ratio changes).
    """
    out = K.clone()
    out[..., 0, :] = K[..., 0, :] * scale_x
    out[..., 1, :] = K[..., 1, :] * scale_y
    return out


def resize_intrinsics(K: Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """``K: (..., 3, 3)`` of an ``in_hw = (H, W)`` image -> ``K`` of the image resized to ``out_hw``.

    Exact for ``torch.nn.functional.interpolate(image, size=out_hw, align_corners=False)``.
    """
    return scale_intrinsics(K, out_hw[1] / in_hw[1], out_hw[0] / in_hw[0])


def crop_intrinsics(K: Tensor, top: int | float, left: int | float) -> Tensor:
    """``K: (..., 3, 3)`` after cropping the image to start at row ``top``, column ``left``.

    The focal lengths are unchanged; the principal point shifts by ``(-left, -top)`` pixels.
    """
    out = K.clone()
    out[..., 0, 2] = K[..., 0, 2] - left
    out[..., 1, 2] = K[..., 1, 2] - top
    return out


@dataclasses.dataclass(frozen=True)
class ResizeCrop:
    """The numbers of one "resize to cover, then centre-crop" step, shared by images and cameras.

    Attributes:
        K: ``(..., 3, 3)`` intrinsics of the output image (``out_hw``).
        in_hw: input image size ``(H, W)``.
        resize_hw: size ``(H_r, W_r)`` the input is resized to; ``H_r >= H_out`` and ``W_r >= W_out``.
        crop_box: ``(top, left, height, width)`` of the crop inside the resized image;
            ``(height, width) == out_hw``.
    """

    K: Tensor
    in_hw: tuple[int, int]
    resize_hw: tuple[int, int]
    crop_box: tuple[int, int, int, int]

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.crop_box[2], self.crop_box[3]

    def apply(self, images: Tensor, mode: str = "bilinear", antialias: bool = True) -> Tensor:
        """Resize and crop ``images: (..., C, H, W)`` float to ``(..., C, H_out, W_out)``.

        Uses ``interpolate(..., size=resize_hw, align_corners=False)`` (the sampling :attr:`K`
        assumes); ``antialias`` only matters when shrinking. ``mode="nearest-exact"`` suits masks.
        """
        if tuple(images.shape[-2:]) != tuple(self.in_hw):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, this ResizeCrop expects {self.in_hw}")
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])
        kwargs = {"align_corners": False, "antialias": antialias} if mode in ("bilinear", "bicubic") else {}
        resized = F.interpolate(flat, size=self.resize_hw, mode=mode, **kwargs)
        top, left, height, width = self.crop_box
        out = resized[..., top : top + height, left : left + width]
        return out.reshape(*lead, *out.shape[-3:])


def resize_and_center_crop(K: Tensor, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> ResizeCrop:
    """Plan "resize (keeping the aspect ratio) until the image covers ``out_hw``, then centre-crop".

    The single place where the resize size, the crop box and the new intrinsics are computed, so
    images (:meth:`ResizeCrop.apply`) and cameras use identical numbers.

    Args:
        K: ``(..., 3, 3)`` pixel intrinsics of the input image.
        in_hw: input size ``(H, W)``.
        out_hw: output size ``(H_out, W_out)``.

    Returns:
        :class:`ResizeCrop`. The resize size is rounded to integers, so the two axes may scale by
        slightly different factors ``W_r / W`` and ``H_r / H``; ``K`` uses exactly those factors.
    """
    (h, w), (ho, wo) = in_hw, out_hw
    if min(h, w, ho, wo) <= 0:
        raise ValueError(f"sizes must be positive, got in_hw={in_hw}, out_hw={out_hw}")
    scale = max(ho / h, wo / w)
    # The axis that sets the scale must land exactly on the output size despite float error.
    rh, rw = max(ho, round(h * scale)), max(wo, round(w * scale))
    top, left = (rh - ho) // 2, (rw - wo) // 2
    new_K = crop_intrinsics(resize_intrinsics(K, (h, w), (rh, rw)), top, left)
    return ResizeCrop(K=new_K, in_hw=(h, w), resize_hw=(rh, rw), crop_box=(top, left, ho, wo))


def pixel_centers(height: int, width: int, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Continuous coordinates of every pixel centre: ``(H, W, 2)`` with ``[v, u] = (u + 0.5, v + 0.5)``."""
    v = torch.arange(height, dtype=dtype, device=device) + 0.5
    u = torch.arange(width, dtype=dtype, device=device) + 0.5
    vv, uu = torch.meshgrid(v, u, indexing="ij")
    return torch.stack([uu, vv], -1)


# ---------------------------------------------------------------------------------------------
# RealEstate10K camera files
# ---------------------------------------------------------------------------------------------

_RE10K_FIELDS = 19


@dataclasses.dataclass
class RealEstateCameras:
    """The content of one RealEstate10K camera file. All float tensors are float64 (the files
    carry 9 decimals, more than float32 holds); call ``.float()`` on what you pass on.

    Attributes:
        url: the source video URL (line 1).
        timestamps_us: ``(T,)`` int64 frame times in microseconds.
        intrinsics: ``(T, 4)`` normalised ``(fx / W, fy / H, cx / W, cy / H)``.
        w2c: ``(T, 4, 4)`` OpenCV world-to-camera, as stored.
        c2w: ``(T, 4, 4)`` OpenCV camera-to-world, ``inv(w2c)``. SfM scale: arbitrary per clip.
    """

    url: str
    timestamps_us: Tensor
    intrinsics: Tensor
    w2c: Tensor
    c2w: Tensor

    def __len__(self) -> int:
        return int(self.timestamps_us.shape[0])

    def K(self, height: int, width: int) -> Tensor:
        """``(T, 3, 3)`` pixel intrinsics for frames of size ``(height, width)``."""
        return normalized_to_pixel_intrinsics(self.intrinsics, height, width)


def read_realestate_cameras(path: str | Path) -> RealEstateCameras:
    """Parse a RealEstate10K camera file.

    Format: line 1 the video URL; every further non-blank line has 19 numbers
    ``timestamp_us fx fy cx cy k1 k2 r11 r12 r13 t1 r21 r22 r23 t2 r31 r32 r33 t3`` with fx, cx
    divided by the image width, fy, cy by the height, ``k1 k2`` unused, and a row-major 3x4 OpenCV
    world-to-camera matrix.

    Raises:
        ValueError: naming the file and the 1-based line number, on a missing URL line, a row
            without 19 fields, a non-integer timestamp, or a non-finite / non-numeric value.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}:1: expected the source video URL on line 1, found an empty line")
    if len(lines[0].split()) == _RE10K_FIELDS:
        raise ValueError(f"{path}:1: expected the source video URL on line 1, found a camera row")
    url = lines[0].strip()
    stamps, values = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != _RE10K_FIELDS:
            raise ValueError(f"{path}:{lineno}: expected {_RE10K_FIELDS} numbers, found {len(fields)}")
        try:
            stamps.append(int(fields[0]))
        except ValueError:
            raise ValueError(f"{path}:{lineno}: timestamp {fields[0]!r} is not an integer (microseconds)") from None
        try:
            row = [float(f) for f in fields[1:]]
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: non-numeric field ({err})") from None
        if not all(math.isfinite(x) for x in row):
            raise ValueError(f"{path}:{lineno}: non-finite value in camera row")
        values.append(row)
    if not values:
        raise ValueError(f"{path}:2: no camera rows after the URL line")
    data = torch.tensor(values, dtype=torch.float64)
    w2c = torch.eye(4, dtype=torch.float64).repeat(len(values), 1, 1)
    w2c[:, :3, :] = data[:, 6:].reshape(-1, 3, 4)
    # A general inverse rather than invert_se3: the stored rotations are orthonormal only to the
    # printed 9 decimals, and c2w must be the exact inverse of what the file says.
    c2w = torch.linalg.inv(w2c)
    return RealEstateCameras(
        url=url,
        timestamps_us=torch.tensor(stamps, dtype=torch.int64),
        intrinsics=data[:, :4].clone(),
        w2c=w2c,
        c2w=c2w,
    )


def write_realestate_cameras(path: str | Path, cameras: RealEstateCameras, decimals: int = 9) -> None:
    """Write ``cameras`` in the RealEstate10K format read by :func:`read_realestate_cameras`.

    Numbers are printed with ``decimals`` fixed decimals (9, like the published files), so a
    read -> write of a published file reproduces it and write -> read is exact to ``1e-decimals``.
    Only ``url``, ``timestamps_us``, ``intrinsics`` and ``w2c`` are written (``c2w`` is derived).
    """
    n = len(cameras)
    if cameras.intrinsics.shape != (n, 4) or cameras.w2c.shape != (n, 4, 4):
        raise ValueError(
            f"expected intrinsics (T, 4) and w2c (T, 4, 4) with T={n}, "
            f"got {tuple(cameras.intrinsics.shape)} and {tuple(cameras.w2c.shape)}"
        )
    if "\n" in cameras.url or not cameras.url.strip():
        raise ValueError("url must be one non-empty line")
    fmt = f"{{:.{decimals}f}}"
    intr = cameras.intrinsics.to(torch.float64).tolist()
    mats = cameras.w2c[:, :3, :].to(torch.float64).reshape(n, 12).tolist()
    rows = [cameras.url.strip()]
    for stamp, k, m in zip(cameras.timestamps_us.tolist(), intr, mats):
        numbers = [*k, 0.0, 0.0, *m]
        rows.append(" ".join([str(int(stamp))] + [fmt.format(x) for x in numbers]))
    Path(path).write_text("\n".join(rows) + "\n")
