"""Headless Chromium for the viewer: screenshots, page text and renders without a display.

``python -m d4d.viewer.browser DIR OUT.png [--size 1280x800]`` serves DIR with the viewer on a free
local port, loads it in headless Chromium (Debian's ``chromium``; software WebGL) and writes a
screenshot: a picture of a 4D output for a report, made on a machine with no screen or GPU.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from d4d.utils.cli_args import OneLineParser, nonneg_int
from d4d.utils.errors import UserError, exit_with_error
from d4d.utils.paths import check_output_file

# A fresh profile per launch and no background traffic: nothing outside localhost is contacted.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-unsafe-swiftshader", "--hide-scrollbars")


def chromium_path() -> str | None:
    """The Chromium executable (``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH)."""
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser"):
        if name and (found := shutil.which(name)):
            return found
    return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def chromium_command(url: str, user_data_dir: str | Path, *extra: str, size=(1280, 800)) -> list[str]:
    exe = chromium_path()
    if exe is None:
        raise UserError("chromium not found (install it: apt-get install -y chromium, or set $CHROMIUM)")
    return [exe, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={size[0]},{size[1]}",
            *extra, url]


class ViewerBrowser:
    """A headless Chromium connected to a :class:`d4d.viewer.app.FourDViewer`, driven over DevTools.

    ``with ViewerBrowser(viewer) as b:`` waits until the viewer sees the browser as a client and
    ``settle_s`` more seconds (scene messages, textures); then :meth:`screenshot` saves the window,
    :meth:`text` returns the page's visible text and :attr:`client` is the viser client handle
    (``client.get_render(h, w)`` renders the 3D canvas in the browser).
    """

    def __init__(self, viewer, size=(1280, 800), settle_s: float = 5.0, timeout: float = 90):
        self.viewer, self.size, self.settle_s, self.timeout = viewer, size, settle_s, timeout
        self._calls = 0

    def __enter__(self) -> "ViewerBrowser":
        import time

        self._profile = tempfile.TemporaryDirectory(prefix="d4d-chromium-")
        self.proc = subprocess.Popen(
            chromium_command(self.viewer.url, self._profile.name, "--remote-debugging-port=0",
                             size=self.size),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + self.timeout
            while not self.viewer.server.get_clients():
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("chromium did not connect to the viewer")
                time.sleep(0.1)
            self.client = next(iter(self.viewer.server.get_clients().values()))
            time.sleep(self.settle_s)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self._profile.cleanup()

    def _devtools(self, method: str, params: dict | None = None) -> dict:
        """One DevTools protocol call on the page; returns its ``result``."""
        import json
        import time
        import urllib.request

        from websockets.sync.client import connect

        port_file, deadline = Path(self._profile.name) / "DevToolsActivePort", time.time() + self.timeout
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.time() > deadline:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=self.timeout) as resp:
            page = next(t for t in json.load(resp) if t.get("type") == "page")
        self._calls += 1
        with connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=self.timeout) as ws:
            ws.send(json.dumps({"id": self._calls, "method": method, "params": params or {}}))
            while (reply := json.loads(ws.recv(timeout=self.timeout))).get("id") != self._calls:
                pass
        if "error" in reply:
            raise RuntimeError(f"DevTools {method}: {reply['error']}")
        return reply["result"]

    def screenshot(self, out_png: str | Path) -> Path:
        """Save the browser window as PNG (``Page.captureScreenshot``)."""
        import base64

        data = self._devtools("Page.captureScreenshot", {"format": "png"})["data"]
        out_png = Path(out_png)
        out_png.parent.mkdir(parents=True, exist_ok=True)
        out_png.write_bytes(base64.b64decode(data))
        return out_png

    def dismiss_notifications(self) -> int:
        """Close the client's toasts (e.g. "Software WebGL rendering detected"); returns how many."""
        import time

        js = ("(() => { const b = document.querySelectorAll('.mantine-Notification-closeButton');"
              " b.forEach(e => e.click()); return b.length; })()")
        result = self._devtools("Runtime.evaluate", {"expression": js, "returnByValue": True})
        count = int(result["result"]["value"])
        time.sleep(0.5 if count else 0.0)  # the close animation
        return count

    def text(self) -> str:
        """The page's visible text (``document.body.innerText``)."""
        result = self._devtools("Runtime.evaluate", {"expression": "document.body.innerText",
                                                     "returnByValue": True})
        return result["result"].get("value", "")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m d4d.viewer.browser", description=__doc__.splitlines()[0],
                           error_prog="d4d.viewer")
    parser.add_argument("dir", help="4D output folder")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--size", default="1280x800", help="window WIDTHxHEIGHT")
    parser.add_argument("--frame", type=nonneg_int, default=0, help="position of the frame to show")
    args = parser.parse_args(argv)
    try:
        check_output_file(args.out, "OUT")
        width, height = (int(v) for v in args.size.lower().split("x"))
        from d4d.view_layout import read_frames
        from d4d.viewer.app import FourDViewer

        frames = read_frames(args.dir)
        if not 0 <= args.frame < len(frames):
            raise UserError(f"--frame {args.frame}: {args.dir} has {len(frames)} frames")
        if chromium_path() is None:
            raise UserError("chromium not found (install it: apt-get install -y chromium, or set $CHROMIUM)")
    except ValueError as exc:
        message = str(exc) if isinstance(exc, UserError) else f"--size {args.size}: expected WxH"
        exit_with_error(message, "d4d.viewer")
    viewer = FourDViewer(frames, port=free_port())
    try:
        viewer.frame_slider.value = args.frame
        with ViewerBrowser(viewer, size=(width, height)) as chromium:
            chromium.dismiss_notifications()
            print(chromium.screenshot(args.out))
    finally:
        viewer.stop()


if __name__ == "__main__":
    main()
