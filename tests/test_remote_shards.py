"""Shards from anywhere (issue 19): http(s), ``pipe:`` and ``file:`` specs read as the local files are.

A ``python -m http.server`` on 127.0.0.1 (started here, stopped by its PID) serves real shards written
with ShardWriter; the tests compare what comes over HTTP or a pipe with what the local files give,
and check that every way of failing (404, refused or unreachable host, a stalled server, a download
cut part way, a command that fails, a shard cut at a member boundary) is an ``unreadable_shard`` or
``truncated_shard`` skip: one line naming the URL, within a bounded time, never a complete shard.
"""
from __future__ import annotations

import re
import shlex
import socket
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from d4d.data.shards import build_clip_pipeline, expand_urls, read_tar_items
from d4d.data.skips import NoUsableSampleError, Skipped
from d4d.utils.errors import UserError
from benchmarks.data_loading import serve_http, stop
from tests.conftest import REPO, run_module
from tests.test_shards import keys_of, sample_key, write_shards

FIELDS = ("frames", "c2w", "K", "depth", "mask")


class Served:
    def __init__(self, root: Path, base: str, log: Path):
        self.root, self.base, self.log = root, base, log


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``root/small``: 6 clips (mp4 frames) in shards of 2, served over HTTP from 127.0.0.1."""
    root = tmp_path_factory.mktemp("served")
    write_shards(root / "small", 6, 2)
    log = root.parent / "http.log"
    proc, base = serve_http(root, log)
    try:
        yield Served(root, base, log)
    finally:
        stop(proc)


@pytest.fixture
def fast_fail(monkeypatch):
    """Short curl timeouts and no retries, so the failure cases take a second at most."""
    monkeypatch.setenv("D4D_SHARD_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("D4D_SHARD_STALL_TIMEOUT", "1")
    monkeypatch.setenv("D4D_SHARD_RETRIES", "0")


def assert_same_samples(remote: list, local: list) -> None:
    assert [s.key for s in remote] == [s.key for s in local] and local
    for r, loc in zip(remote, local):
        for name in FIELDS:
            a, b = getattr(r, name), getattr(loc, name)
            assert (a is None and b is None) or torch.equal(a, b), (r.key, name)
        assert r.meta == loc.meta


def only_skip(items: list, reason: str, url: str) -> Skipped:
    """The one Skipped marker of ``items`` (the last item): of ``reason``, one line, naming ``url``."""
    skipped = [i for i in items if isinstance(i, Skipped)]
    assert len(skipped) == 1 and items[-1] is skipped[0], items
    skip = skipped[0]
    assert skip.reason == reason and url in skip.message and skip.shard == url, skip
    assert "\n" not in skip.message and "Traceback" not in skip.message
    return skip


# ----------------------------------------------------------------------------------- same data
def test_http_brace_spec_streams_what_the_local_files_hold(served):
    spec = f"{served.base}/small/shard-{{000000..000002}}.tar"
    urls = expand_urls(spec)
    assert urls == [f"{served.base}/small/shard-{i:06d}.tar" for i in range(3)]
    local = sorted(str(p) for p in (served.root / "small").glob("*.tar"))
    for url, path in zip(urls, local):  # byte for byte, sample for sample
        remote_raw, local_raw = list(read_tar_items(url)), list(read_tar_items(path))
        assert [{k: v for k, v in r.items() if k != "__url__"} for r in remote_raw] == \
               [{k: v for k, v in r.items() if k != "__url__"} for r in local_raw]
        assert {r["__url__"] for r in remote_raw} == {url}
    remote = list(build_clip_pipeline(spec))
    assert_same_samples(remote, list(build_clip_pipeline(str(served.root / "small"))))
    assert [s.shard for s in remote] == [urls[i // 2] for i in range(6)]


def test_http_shards_split_over_workers_and_resample(served):
    spec = f"{served.base}/small/shard-{{000000..000002}}.tar"
    loader = DataLoader(build_clip_pipeline(spec, transform=sample_key, shuffle=4, seed=3), batch_size=None,
                        num_workers=2)
    assert sorted(loader) == [f"clip{i:04d}" for i in range(6)]  # each shard read once, by one worker
    drawn = build_clip_pipeline(spec, resampled=True, epoch_length=10, transform=sample_key, seed=1)
    local = build_clip_pipeline(str(served.root / "small"), resampled=True, epoch_length=10,
                                transform=sample_key, seed=1)
    assert keys_of(drawn) == keys_of(local)  # the same draws: randomness depends on the url list only


def test_pipe_and_file_specs(served):
    small = served.root / "small"
    local = list(build_clip_pipeline(str(small)))
    pipe_spec = f"pipe:cat {shlex.quote(str(small))}/shard-{{000000..000002}}.tar"
    assert len(expand_urls(pipe_spec)) == 3
    assert_same_samples(list(build_clip_pipeline(pipe_spec)), local)
    file_spec = f"file://{small}/shard-{{000000..000002}}.tar"
    assert expand_urls(file_spec) == [str(small / f"shard-{i:06d}.tar") for i in range(3)]  # local paths
    assert_same_samples(list(build_clip_pipeline(file_spec)), local)
    assert expand_urls(f"file://{small}") == expand_urls(str(small))  # a directory, as a path would be
    with pytest.raises(UserError, match="shard-000003.tar' does not exist"):
        expand_urls(f"file://{small}/shard-{{000002..000003}}.tar")


# --------------------------------------------------------------------------------- failures
@pytest.mark.parametrize("where", ["between two files", "inside a file"])
def test_truncated_shard_over_http_is_reported_truncated(served, tmp_path, where):
    (shard,) = write_shards(tmp_path, 5, 5, frame_format="npy")
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    data = shard.read_bytes()
    # at the header of clip0003's first file, tarfile (and webdataset) would end silently; clip0002 is
    # known to be whole only once that header is read, so a cut there loses it
    first_of_clip3 = next(m for m in members if m.name.startswith("clip0003."))
    cut, complete = ((first_of_clip3.offset, 2) if where == "between two files"
                     else (first_of_clip3.offset_data + 100, 3))
    name = f"cut-{where.replace(' ', '-')}.tar"
    (served.root / name).write_bytes(data[:cut])
    url = f"{served.base}/{name}"
    items = list(read_tar_items(url))
    expected = [f"clip{i:04d}" for i in range(complete)]
    assert [i["__key__"] for i in items[:-1]] == expected
    skip = only_skip(items, "truncated_shard", url)
    assert f"after {complete} complete samples" in skip.message and f"'clip{complete:04d}'" in skip.message
    local = list(read_tar_items(str(served.root / name)))  # the same items as the file gives
    assert [i["__key__"] for i in local[:-1]] == expected and local[-1].reason == "truncated_shard"
    dataset = build_clip_pipeline(url, max_skip_fraction=1.0, transform=sample_key)
    assert keys_of(dataset) == expected and dataset.stats.by_reason == {"truncated_shard": 1}


def test_download_cut_part_way_is_truncated_not_complete(served, fast_fail):
    """The server promises the whole shard and closes the connection half way: curl fails (18)."""
    data = (served.root / "small" / "shard-000001.tar").read_bytes()
    cut = next(m for m in tarfile.open(served.root / "small" / "shard-000001.tar").getmembers()
               if m.name.startswith("clip0003.")).offset  # a member boundary: only the status tells
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_cut():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data[:cut])

    thread = threading.Thread(target=serve_cut, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}/shard-000001.tar"
    try:
        items = list(read_tar_items(url))
    finally:
        thread.join(10)
        listener.close()
    assert [i["__key__"] for i in items[:-1]] == []  # clip0002 is only whole once clip0003 starts
    skip = only_skip(items, "truncated_shard", url)
    assert "curl exited with status 18" in skip.message and "'clip0002'" in skip.message


def test_http_404_is_an_unreadable_shard(served):
    url = f"{served.base}/small/shard-000009.tar"
    skip = only_skip(list(read_tar_items(url)), "unreadable_shard", url)
    assert "404" in skip.message and "status 22" in skip.message
    # counted like any unreadable shard, next to the good ones; all missing: a one-line error
    dataset = build_clip_pipeline([f"{served.base}/small/shard-000000.tar", url], max_skip_fraction=1.0,
                                  transform=sample_key)
    assert keys_of(dataset) == ["clip0000", "clip0001"]
    assert dataset.stats.as_dict() == {"seen": 3, "skipped": 1, "by_reason": {"unreadable_shard": 1}}
    with pytest.raises(NoUsableSampleError, match=re.escape(url)) as err:
        list(build_clip_pipeline(url))
    assert "\n" not in str(err.value)
    # a password in a URL is not written to logs
    secret = f"http://user:hunter2@{served.base[len('http://'):]}/small/shard-000009.tar"
    (skip,) = read_tar_items(secret)
    assert "hunter2" not in skip.message + skip.shard and "user:***@" in skip.message


# a hang detector, not a speed check: with the 1 s timeouts each URL fails in about a second, and
# without them curl waits for minutes on the silent server; pytest-timeout fails a hang
@pytest.mark.timeout(120)
def test_unreachable_hosts_fail_fast_with_one_line(fast_fail):
    closed = socket.create_server(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}/shard-000000.tar"
    closed.close()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers
    full = socket.socket()  # a listen backlog kept full: the next connection attempt is never answered
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(full.getsockname())
        fillers.append(c)
    cases = {refused: "status 7",
             f"http://127.0.0.1:{silent.getsockname()[1]}/shard-000000.tar": "status 28",
             f"http://127.0.0.1:{full.getsockname()[1]}/shard-000000.tar": "status 28",
             "http://10.255.255.1/shard-000000.tar": ""}  # non-routable (a sandbox may answer it itself)
    try:
        for url, expected in cases.items():
            skip = only_skip(list(read_tar_items(url)), "unreadable_shard", url)
            assert expected in skip.message and "cannot fetch: curl exited" in skip.message
    finally:
        for s in [silent, full, *fillers]:
            s.close()


def test_failed_commands_are_never_complete_shards(served):
    path = shlex.quote(str(served.root / "small" / "shard-000000.tar"))
    url = "pipe:false"
    skip = only_skip(list(read_tar_items(url)), "unreadable_shard", url)
    assert skip.message == "shard pipe:false: cannot fetch: command exited with status 1"
    url = "pipe:echo oops >&2; exit 4"
    skip = only_skip(list(read_tar_items(url)), "unreadable_shard", url)
    assert skip.message.endswith("command exited with status 4: oops")
    url = f"pipe:cat {path}; exit 3"  # the whole tar, then a failure: the held-back last sample is lost
    items = list(read_tar_items(url))
    assert [i["__key__"] for i in items[:-1]] == ["clip0000"]
    assert "status 3" in only_skip(items, "truncated_shard", url).message
    url = f"pipe:head -c 0 {path}"  # no bytes, exit 0: not a tar, not an empty shard
    assert "empty file" in only_skip(list(read_tar_items(url)), "unreadable_shard", url).message


def test_bad_remote_specs_are_one_line_user_errors(tmp_path, monkeypatch):
    for spec, expected in [("s3://bucket/shard-000000.tar", "pipe:aws s3 cp"),
                           ("http://127.0.0.1:1/shards/", "cannot be listed"),
                           ("https://host/shard-*.tar", "cannot be listed or globbed"),
                           ("pipe:  ", "needs a command"),
                           ("file://otherhost/data/shard.tar", "not this machine"),
                           ("http:///shard.tar", "not a valid URL")]:
        with pytest.raises(UserError, match=re.escape(expected)) as err:
            expand_urls(spec)
        assert "\n" not in str(err.value)
    monkeypatch.setenv("D4D_SHARD_CONNECT_TIMEOUT", "soon")
    with pytest.raises(UserError, match="D4D_SHARD_CONNECT_TIMEOUT='soon': not a number"):
        expand_urls("http://127.0.0.1:1/shard-000000.tar")
    monkeypatch.delenv("D4D_SHARD_CONNECT_TIMEOUT")
    # mixed lists keep their order; a name with a colon that is no known scheme stays a path
    (tmp_path / "shard:1.tar").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert expand_urls(["pipe:cat x", "shard:1.tar", "https://h/s.tar?sig=1"]) == \
        ["pipe:cat x", "shard:1.tar", "https://h/s.tar?sig=1"]
    proc = run_module("d4d.evaluate", "--shards", "s3://bucket/shard-{000000..000001}.tar", "--out",
                      str(tmp_path / "eval"), "--baseline", "repeat-first", check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "scheme 's3' is not supported" in proc.stderr


# -------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_fit_reads_its_training_shards_over_http(served, synthetic_data, tmp_path):
    """The classifier debug recipe, its training shards fetched from 127.0.0.1 (validation stays local)."""
    names = sorted(p.name for p in (synthetic_data / "train").glob("*.tar"))
    assert names == [f"shard-{i:06d}.tar" for i in range(len(names))]
    link = served.root / "synthetic"
    if not link.exists():
        link.symlink_to(synthetic_data, target_is_directory=True)
    train = f"{served.base}/synthetic/train/shard-{{000000..{len(names) - 1:06d}}}.tar"
    recipe = tmp_path / "classifier.yaml"
    recipe.write_text((REPO / "recipes/debug/classifier.yaml").read_text()
                      .replace("data/synthetic/train", train).replace("data/synthetic", str(synthetic_data)))
    run = tmp_path / "run"
    run_module("d4d.fit", str(recipe), "--run_dir", str(run), "--trainer.logger.init_args.offline", "true",
               "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--test_after_fit", "false",
               "--data.init_args.episodes_per_epoch", "2", "--data.init_args.image_size", "32", timeout=600)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert state["global_step"] == 2
    log = served.log.read_text()
    requested = set(re.findall(r'"GET /synthetic/train/(shard-\d+\.tar) HTTP/1\.1" 200', log))
    assert requested and requested <= set(names)
