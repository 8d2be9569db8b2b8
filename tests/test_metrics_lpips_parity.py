"""Our AlexNet LPIPS against the ``lpips`` package (GPU installs with torchvision; skipped elsewhere).
The same comparison with figures: ``python -m benchmarks.lpips_parity``."""
from __future__ import annotations

import pytest


def test_lpips_package_parity():
    pytest.importorskip("lpips", reason="the lpips package (needs torchvision) is not installed")
    from d4d.metrics.lpips import find_alexnet_weights
    from d4d.utils.errors import UserError

    try:
        find_alexnet_weights()
    except UserError as exc:
        pytest.skip(str(exc))
    from benchmarks.lpips_parity import compare

    rows = compare("cpu", size=64, pairs=2)
    assert len(rows) >= 5
    for r in rows:
        assert r["max_map_diff"] < 1e-4, r
        assert r["ours"] == pytest.approx(r["lpips"], abs=1e-5), r
    noise = [r["ours"] for r in rows if r["case"].startswith("noise")]
    assert noise == sorted(noise)  # more noise, larger distance
