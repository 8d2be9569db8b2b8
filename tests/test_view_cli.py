"""``python -m d4d.view DIR --port P`` as a user runs it: it prints the URL once the server answers
HTTP on 127.0.0.1:P, and SIGTERM or SIGINT stops it with exit status 0, leaving the folder as it was."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO

SERVING = re.compile(r"4D viewer: serving (http://\S+)")


def folder_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha1}`` of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def serve_then_stop(cmd: list[str], port: int, sig: int, timeout_s: float = 120.0) -> tuple[int, str, str]:
    """Start ``cmd`` (a ``python -m ...`` list), wait for its "serving URL" line and for
    ``http://127.0.0.1:port/`` to answer 200 with the viser page, send ``sig``; returns
    ``(exit status, stdout, the page)``."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        url = None
        while url is None:
            line = proc.stdout.readline()
            so_far = "".join(lines)[-3000:]
            assert line or proc.poll() is None, f"exited {proc.poll()} before serving:\n{so_far}"
            assert time.monotonic() < deadline, f"no 'serving' line in {timeout_s} s:\n{so_far}"
            lines.append(line)
            found = SERVING.search(line)
            url = found and found.group(1)
        assert url == f"http://127.0.0.1:{port}", url
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.status == 200
            page = response.read().decode("utf-8", "replace")
        assert proc.poll() is None  # still serving after answering
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, "".join(lines) + out, page


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from d4d.viewer.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("view_cli") / "out", motion="orbit", num_frames=3, size=24)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_view_serves_then_stops_cleanly(sample, sig):
    from d4d.viewer.browser import free_port

    before = folder_digest(sample)
    port = free_port()
    code, out, page = serve_then_stop(["d4d.view", str(sample), "--port", str(port)], port, sig)
    assert code == 0, out[-3000:]
    assert "<html" in page.lower() and "viser" in page.lower()
    assert "4D viewer: stopped" in out and "Traceback" not in out
    assert folder_digest(sample) == before  # the viewer only reads


def test_view_bad_port_is_one_line(sample):
    proc = subprocess.run(
        [sys.executable, "-m", "d4d.view", str(sample), "--port", "70000"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "70000" in proc.stderr.strip().splitlines()[-1]
