"""frames.mp4 encoding (PyAV) and decoding: decord where it imports (the ``video`` extra), PyAV
otherwise and where decord cannot copy the frame; both give the same frames, and PyAV stops after
the last frame asked for."""
import sys
from pathlib import Path

import numpy as np
import pytest

from d4d.data import video
from d4d.data.video import VideoDecodeError, decode_mp4, encode_mp4, read_video

RE10K_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "realestate10k" / "videos"


def _frames(width: int, t: int = 6, height: int = 32) -> np.ndarray:
    tt = np.linspace(0, 1, t)[:, None, None]
    x = np.linspace(0, 1, width)[None, None, :]
    y = np.linspace(0, 1, height)[None, :, None]
    frames = np.stack([255 * x * (1 - tt) + 0 * y, 255 * y + 0 * x * tt, 128 + 100 * tt + 0 * x * y], -1)
    return np.broadcast_to(frames, (t, height, width, 3)).astype(np.uint8)


def _moving(t: int = 30, width: int = 64, height: int = 64) -> np.ndarray:
    """A smooth pattern panning right, so every frame differs (a wrong frame index shows) and H.264
    keeps it within a few levels."""
    y, x = np.mgrid[0:height, 0:width + 2 * t].astype(float)
    base = np.stack([128 + 90 * np.sin(x / 11 + y / 17), 128 + 90 * np.cos(y / 13 - x / 19), 128 + 60 * np.sin(x / 23)], -1)
    return np.stack([base[:, 2 * i:2 * i + width] for i in range(t)]).round().astype(np.uint8)


@pytest.fixture
def no_decord(monkeypatch):
    """``import decord`` fails, as on an aarch64 or macOS arm64 install without the video extra."""
    monkeypatch.setitem(sys.modules, "decord", None)
    assert not video.decord_available()


@pytest.fixture
def decoded_frames(monkeypatch):
    """Counts the frames PyAV's decoder hands out (the early stop, without timing anything)."""
    counts = []
    original = video._pyav_frames

    def counting(container):
        counts.append(0)
        for frame in original(container):
            counts[-1] += 1
            yield frame

    monkeypatch.setattr(video, "_pyav_frames", counting)
    return counts


@pytest.mark.parametrize("width", [16, 24, 32, 40, 48, 64, 72, 384])
def test_mp4_round_trip_any_even_width(width):
    frames = _frames(width)
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


@pytest.mark.parametrize("width", [32, 40, 64, 384])  # widths decord itself decodes
def test_decord_and_pyav_give_identical_frames(width):
    decord = pytest.importorskip("decord", reason="decord (the video extra) is not installed")
    data = encode_mp4(_moving(12, width))
    by_decord, fps_decord = video._decode_decord(decord, data, None)
    by_pyav, fps_pyav = video._decode_pyav(data, None)
    np.testing.assert_array_equal(by_pyav, by_decord)
    assert fps_pyav == fps_decord
    for indices in ([0], [3, 0, 3], [11], [-1, 2]):
        np.testing.assert_array_equal(video._decode_pyav(data, indices)[0], by_decord[indices])


@pytest.mark.skipif(not RE10K_VIDEOS.is_dir(), reason=f"RealEstate10K sample not found at {RE10K_VIDEOS}")
def test_decord_and_pyav_give_identical_frames_of_real_clips(monkeypatch):
    pytest.importorskip("decord", reason="decord (the video extra) is not installed")
    for path in sorted(RE10K_VIDEOS.glob("*.mp4"))[:3]:
        by_decord, fps = read_video(path)
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "decord", None)
            by_pyav, fps_pyav = read_video(path)
            first = decode_mp4(path.read_bytes(), [0])
        np.testing.assert_array_equal(by_pyav, by_decord)
        np.testing.assert_array_equal(first, by_decord[:1])
        assert fps_pyav == fps


def test_without_decord_pyav_decodes_the_same_frames_and_stops_early(no_decord, decoded_frames):
    clip = _moving(30, 64)
    data = encode_mp4(clip)
    full = decode_mp4(data)
    assert full.shape == clip.shape and np.abs(full.astype(int) - clip).mean() < 3.0
    assert decoded_frames == [30]
    first = decode_mp4(data, [0])
    assert decoded_frames[-1] == 1  # one frame decoded, not the clip
    picked = decode_mp4(data, [7, 2, 7])
    assert decoded_frames[-1] == 8  # up to the last needed frame
    np.testing.assert_array_equal(first, full[:1])
    np.testing.assert_array_equal(picked, full[[7, 2, 7]])
    np.testing.assert_array_equal(decode_mp4(data, [-1]), full[-1:])  # negative: needs the whole clip
    assert decoded_frames[-1] == 30


def test_without_decord_the_decord_widths_decode_too(no_decord):
    frames = _frames(16)
    decoded = decode_mp4(encode_mp4(frames))
    assert decoded.shape == frames.shape and np.abs(decoded.astype(int) - frames).mean() < 3.0


@pytest.mark.parametrize("with_decord", [True, False])
def test_bad_indices_and_bad_bytes(with_decord, monkeypatch):
    if with_decord:
        pytest.importorskip("decord", reason="decord (the video extra) is not installed")
    else:
        monkeypatch.setitem(sys.modules, "decord", None)
    data = encode_mp4(_moving(6, 32))
    with pytest.raises(IndexError, match="frame index 6 out of range: the video has 6 frames"):
        decode_mp4(data, [0, 6])
    with pytest.raises(VideoDecodeError):
        decode_mp4(b"not a video")
    with pytest.raises(VideoDecodeError):
        decode_mp4(data[:len(data) // 2])


@pytest.mark.skipif(not RE10K_VIDEOS.is_dir(), reason=f"RealEstate10K sample not found at {RE10K_VIDEOS}")
@pytest.mark.parametrize("with_decord", [True, False])
def test_realestate10k_videos_with_either_decoder(with_decord, tmp_path, monkeypatch):
    from data_prep.realestate10k import Reject, load_video

    if with_decord:
        pytest.importorskip("decord", reason="decord (the video extra) is not installed")
    else:
        monkeypatch.setitem(sys.modules, "decord", None)
    path = sorted(RE10K_VIDEOS.glob("*.mp4"))[0]
    frames, fps = load_video(path, 16)
    assert frames.shape == (16, 256, 384, 3) and fps == 8.0
    with pytest.raises(Reject, match="missing frames: video has 16 frames, camera file 17 rows"):
        load_video(path, 17)
    (tmp_path / "cut.mp4").write_bytes(path.read_bytes()[:3000])
    (tmp_path / "garbage.mp4").write_bytes(b"not a video")
    for name in ("cut.mp4", "garbage.mp4"):
        with pytest.raises(Reject, match=f"undecodable video {name}: "):
            load_video(tmp_path / name, 16)
