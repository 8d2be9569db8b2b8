"""``python -m d4d.view DIR``: browse a saved 4D output in the browser (viser, localhost).

DIR holds the per-frame layout of ``reference.md`` section 7 (:mod:`d4d.view_layout`): ``depth/``,
``confidence/``, ``color/``, ``camera/`` with ``NNNN`` files, as ``d4d.generate`` and the 4D
generator's ``export_frames`` write it. Open the printed URL; a time slider (and Play) steps
through the frames, cameras are drawn as frusta with their images, a slider hides points below a
confidence, another sets the point size. To reach a remote machine, forward the port
(``ssh -L 8080:localhost:8080 host``) rather than serving on 0.0.0.0. Once the server answers, one
line ``4D viewer: serving http://HOST:PORT`` is printed (the port actually in use); SIGINT (Ctrl-C) or
SIGTERM stops it and the command exits 0.
"""
from __future__ import annotations

import argparse

from d4d.utils.cli_args import OneLineParser, float_in, positive_float, positive_int
from d4d.utils.errors import UserError, exit_with_error

PROG = "d4d.view"


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (1-65535)")
    return value


def _wait_until_listening(url: str, timeout_s: float = 30.0) -> bool:
    """Wait until ``url``'s host:port accepts TCP connections (viser serves from its own thread), so
    that the "serving" line means a browser can connect. False if it did not within ``timeout_s``."""
    import socket
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host = "127.0.0.1" if parts.hostname in ("0.0.0.0", "") else parts.hostname
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, parts.port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0], error_prog=PROG)
    parser.add_argument("dir", help="4D output folder (depth/ confidence/ color/ camera/)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1, local only)")
    parser.add_argument("--port", type=_port, default=8080,
                        help="port (default 8080; viser takes the next free one if it is busy)")
    parser.add_argument("--max-points", type=positive_int, default=300_000,
                        help="points per frame shown (default 300000; a pixel stride keeps it under)")
    parser.add_argument("--point-size", type=positive_float, default=None,
                        help="world units (default: 1.5 pixel footprints at the median depth)")
    parser.add_argument("--fps", type=float_in(0.5, 60.0), default=8.0,
                        help="playback frames per second (0.5 to 60, the viewer's slider)")
    args = parser.parse_args(argv)
    try:
        from d4d.utils.logging import get_logger
        from d4d.view_layout import frame_indices, read_frame

        log = get_logger(PROG)
        indices = frame_indices(args.dir)
        if args.max_points < 1:
            raise UserError(f"--max-points {args.max_points}: must be >= 1")
        log.info("reading %d frames from %s", len(indices), args.dir)
        from tqdm import tqdm

        frames = [read_frame(args.dir, i) for i in tqdm(indices, desc="frames", unit="frame", leave=False)]
    except UserError as exc:
        exit_with_error(str(exc), PROG)

    from d4d.viewer.app import FourDViewer

    try:
        viewer = FourDViewer(frames, host=args.host, port=args.port, max_points=args.max_points,
                             point_size=args.point_size, fps=args.fps)
    except UserError as exc:
        exit_with_error(str(exc), PROG)
    import signal

    received: list[str] = []

    def _on_signal(signum, _frame) -> None:  # only sets an event: logging here could deadlock
        received.append(signal.Signals(signum).name)
        viewer.request_stop()

    # SIGTERM (a job scheduler, `kill`) and SIGINT (Ctrl-C) both end the serving loop cleanly: exit 0.
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    state = "serving" if _wait_until_listening(viewer.url) else "started, but not answering yet at"
    print(f"4D viewer: {state} {viewer.url}  ({len(frames)} frames; Ctrl-C to stop)", flush=True)
    viewer.run()
    print(f"4D viewer: stopped{f' ({received[0]})' if received else ''}", flush=True)


if __name__ == "__main__":
    main()
