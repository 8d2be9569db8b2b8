"""Occlusion-sensitive masking (Dream4D): which key tokens of frame b were also visible in frame a.

A key of frame ``b`` that shows content not visible from frame ``a`` (disoccluded by the camera
move, or outside ``a``'s view) has no epipolar counterpart in ``a``; Dream4D suppresses such keys
for the queries of ``a``. Choice made here (``reference.md`` section 4 leaves it open), a forward
warp consistency check of each key token centre:

* with depth of both frames (z-depth at token resolution): back-project the key of ``b`` with its
  depth, transform it into camera ``a`` and project. It is covisible when it lands in front of ``a``,
  inside ``a``'s image, and not behind ``a``'s own depth there (``z_a <= depth_a (1 + rel_tol)``):
  a point that ``a`` sees something in front of was occluded in ``a`` and is disoccluded in ``b``.
  Tokens without valid depth (0) count as covisible;
* without depth (real videos at sampling time): the point is put at infinity, so only the rotation
  matters and the test is "inside ``a``'s view" (scale-free, since SfM translations have no unit).

A frame is always covisible with itself.
"""
from __future__ import annotations

import torch

from d4d.geometry.cameras import invert_se3
from d4d.geometry.epipolar import token_centers
from d4d.geometry.precision import full_precision

Tensor = torch.Tensor


@full_precision
def covisible_keys(c2w: Tensor, K: Tensor, image_hw: tuple[int, int], grid_hw: tuple[int, int], token_px: int,
                   depth: Tensor | None = None, rel_tol: float = 0.05) -> Tensor:
    """Covisibility of key tokens.

    Args:
        c2w: ``(T, 4, 4)`` OpenCV camera-to-world of the token frames.
        K: ``(T, 3, 3)`` or ``(3, 3)`` pixel intrinsics at ``image_hw``.
        grid_hw: token grid ``(h, w)``, ``token_px`` image pixels per token side.
        depth: ``(T, h, w)`` z-depth per token (translation units, 0 = unknown) or None.

    Returns:
        bool ``(T, T, h * w)``: ``[a, b, n]`` True when key token ``n`` of frame ``b`` is visible in ``a``.
    """
    num = c2w.shape[0]
    c2w = c2w.to(torch.float64)
    K = K.to(torch.float64).expand(num, 3, 3)
    centers = token_centers(grid_hw, token_px, device=c2w.device)  # (N, 2)
    pix = torch.cat([centers, torch.ones_like(centers[:, :1])], -1)  # (N, 3)
    rays_b = (torch.linalg.inv_ex(K).inverse @ pix.T).transpose(1, 2)  # (T_b, N, 3), z = 1; inv_ex: no error-check sync
    rel = invert_se3(c2w)[:, None] @ c2w[None, :]  # [a, b]: camera b -> camera a
    rot, trans = rel[..., :3, :3], rel[..., :3, 3]
    if depth is None:
        pts_a = torch.einsum("abij,bnj->abni", rot, rays_b)  # directions at infinity
    else:
        z_b = depth.to(torch.float64).reshape(num, -1)  # (T_b, N)
        pts_b = rays_b * z_b[..., None]
        pts_a = torch.einsum("abij,bnj->abni", rot, pts_b) + trans[:, :, None, :]
    z = pts_a[..., 2]
    proj = torch.einsum("aij,abnj->abni", K, pts_a)
    u = proj[..., 0] / z.clamp_min(1e-12)
    v = proj[..., 1] / z.clamp_min(1e-12)
    height, width = image_hw
    visible = (z > 1e-9) & (u >= 0) & (u < width) & (v >= 0) & (v < height)
    if depth is not None:
        h, w = grid_hw
        col = (u / token_px).floor().clamp(0, w - 1).long()
        row = (v / token_px).floor().clamp(0, h - 1).long()
        depth_a = depth.to(torch.float64).reshape(num, -1)
        seen = torch.gather(depth_a[:, None, :].expand(num, num, -1), 2, row * w + col)
        not_hidden = (seen <= 0) | (z <= seen * (1 + rel_tol))
        visible = visible & not_hidden
        visible |= (z_b <= 0)[None]  # no depth for the key: cannot tell, keep it
    eye = torch.eye(num, dtype=torch.bool, device=c2w.device)[..., None]
    return visible | eye
