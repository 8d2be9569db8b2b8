"""frames.mp4 encoding (PyAV) and decoding (decord, PyAV where decord cannot copy the frame)."""
import numpy as np
import pytest

from d4d.data.video import decode_mp4, encode_mp4


@pytest.mark.parametrize("width", [16, 24, 32, 40, 48, 64, 72, 384])
def test_mp4_round_trip_any_even_width(width):
    t = np.linspace(0, 1, 6)[:, None, None]
    x = np.linspace(0, 1, width)[None, None, :]
    y = np.linspace(0, 1, 32)[None, :, None]
    frames = np.stack([255 * x * (1 - t) + 0 * y, 255 * y + 0 * x * t, 128 + 100 * t + 0 * x * y], -1)
    frames = np.broadcast_to(frames, (6, 32, width, 3)).astype(np.uint8)
    decoded = decode_mp4(encode_mp4(frames))
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames).mean() < 3.0
    encodings = {encode_mp4(frames) for _ in range(3)}
    assert len(encodings) == 1  # reproducible bytes: same inputs, same shards
    picked = decode_mp4(encodings.pop(), indices=[0, 5])
    np.testing.assert_array_equal(picked, decoded[[0, 5]])


def test_encode_rejects_odd_size_and_bad_dtype():
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 31, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 32, 32, 3), np.float32))
