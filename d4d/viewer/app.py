"""A viser server showing exported 4D frames (:mod:`d4d.view_layout`) over time.

Scene (OpenCV world of the export, y down): the current frame's world points (coloured, filtered
by confidence), every input camera as a frustum carrying its frame image (the current one
highlighted), and the camera path as a line. GUI: frame slider, play / fps, confidence threshold,
point size, "all cameras" toggle. The browser's up direction is the first camera's -y.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from d4d.utils.logging import get_logger
from d4d.view_layout import Frame, frame_points

log = get_logger(__name__)

CURRENT = (255, 120, 0)
OTHER = (110, 110, 110)


def _wxyz(rotation: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> (4,) quaternion w, x, y, z (viser's convention)."""
    from viser.transforms import SO3

    return SO3.from_matrix(rotation).wxyz


def _thumbnail(rgb: np.ndarray, width: int) -> np.ndarray:
    if rgb.shape[1] <= width:
        return rgb
    from PIL import Image

    height = max(1, round(rgb.shape[0] * width / rgb.shape[1]))
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.BILINEAR))


def check_host(host: str) -> None:
    """UserError unless ``host`` is an address this machine can listen on (viser would otherwise
    try 1000 ports and then wait forever)."""
    import socket

    from d4d.utils.errors import UserError

    try:
        family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind(address)
    except OSError as exc:
        raise UserError(f"--host {host}: cannot listen on this address ({exc.strerror or exc})") from None


class FourDViewer:
    """Serve ``frames`` on ``http://host:port``; :meth:`run` blocks, :meth:`stop` shuts down.

    Args:
        frames: from :func:`d4d.view_layout.read_frames` (same H, W not required).
        max_points: per-frame cap; a pixel stride is chosen so that H*W/stride^2 <= max_points.
        point_size: in world units; default 1.5 pixel footprints at the median depth.
        thumbnail_width: width of the frame images drawn in the frusta (pixels).
    """

    def __init__(self, frames: list[Frame], host: str = "127.0.0.1", port: int = 8080,
                 max_points: int = 300_000, point_size: float | None = None, fps: float = 8.0,
                 thumbnail_width: int = 160):
        import logging

        import viser

        # A browser tab closing mid-handshake is routine; the websockets library logs it as a traceback.
        logging.getLogger("websockets.server").setLevel(logging.CRITICAL)
        self.frames = frames
        depths = np.concatenate([f.depth[np.isfinite(f.depth) & (f.depth > 0)] for f in frames])
        self.scene_depth = float(np.median(depths)) if depths.size else 1.0
        confs = np.concatenate([f.confidence[np.isfinite(f.confidence)] for f in frames])
        self.conf_range = (float(confs.min()), float(np.percentile(confs, 99))) if confs.size else (0.0, 1.0)
        self.strides = [max(1, math.ceil(math.sqrt(f.height * f.width / max_points))) for f in frames]
        # Default point size: a little over one pixel's footprint at the median depth.
        footprint = np.median([s / f.K[0, 0] for s, f in zip(self.strides, frames)]) * self.scene_depth
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._closed, self._close_lock = False, threading.Lock()

        check_host(host)
        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.url = f"http://{host}:{self.server.get_port()}"
        self._build_scene(thumbnail_width)
        self._build_gui(point_size or 1.5 * footprint, fps)
        self.update()

    # -- construction -------------------------------------------------------------------------
    def _build_scene(self, thumbnail_width: int) -> None:
        scene, first = self.server.scene, self.frames[0].c2w
        scene.set_up_direction(tuple(-first[:3, 1]))
        self.frusta = []
        for f in self.frames:
            fov = 2.0 * math.atan(f.height / (2.0 * f.K[1, 1]))
            self.frusta.append(scene.add_camera_frustum(
                f"/cameras/{f.index:04d}", fov=fov, aspect=f.width / f.height, scale=0.05 * self.scene_depth,
                thickness=0.004 * self.scene_depth, color=OTHER, image=_thumbnail(f.rgb, thumbnail_width),
                wxyz=_wxyz(f.c2w[:3, :3]), position=f.c2w[:3, 3]))
        centres = np.stack([f.c2w[:3, 3] for f in self.frames])
        if len(centres) > 1:
            segments = np.stack([centres[:-1], centres[1:]], axis=1)
            scene.add_line_segments("/camera_path", segments, colors=CURRENT,
                                    thickness=0.003 * self.scene_depth)
        self.points = scene.add_point_cloud("/points", np.zeros((1, 3), np.float32),
                                            np.zeros((1, 3), np.uint8),
                                            point_size=0.01, point_shape="square", precision="float32",
                                            point_shading="flat")
        # Start behind and above the first camera, looking into the scene.
        ahead, down = first[:3, 2], first[:3, 1]
        back_and_up = self.scene_depth * (1.0 * ahead + 0.7 * down)
        self.server.initial_camera.position = tuple(first[:3, 3] - back_and_up)
        self.server.initial_camera.look_at = tuple(first[:3, 3] + 0.8 * self.scene_depth * ahead)
        self.server.initial_camera.up = tuple(-down)

    def _build_gui(self, point_size: float, fps: float) -> None:
        gui, n = self.server.gui, len(self.frames)
        gui.add_markdown(f"**{n} frames**, {self.frames[0].height}x{self.frames[0].width}, "
                         f"median depth {self.scene_depth:.3g}")
        self.frame_slider = gui.add_slider("Frame", 0, max(n - 1, 1), 1, 0, disabled=n == 1)
        self.play = gui.add_checkbox("Play", False, disabled=n == 1)
        self.fps = gui.add_number("FPS", fps, min=0.5, max=60.0, step=0.5)
        lo, hi = self.conf_range
        step = max((hi - lo) / 100.0, 1e-6)
        self.conf_slider = gui.add_slider("Min confidence", lo, max(hi, lo + step), step, lo,
                                          hint="hide points whose confidence is below this")
        self.size_slider = gui.add_slider("Point size", point_size / 10, point_size * 10, point_size / 10,
                                          point_size)
        self.all_cameras = gui.add_checkbox("All cameras", True)
        self.info = gui.add_markdown("")
        for handle in (self.frame_slider, self.conf_slider, self.all_cameras):
            handle.on_update(lambda _: self.update())
        self.size_slider.on_update(
            lambda _: setattr(self.points, "point_size", float(self.size_slider.value)))

    # -- state --------------------------------------------------------------------------------
    @property
    def current(self) -> int:
        """Position (not file index) of the frame shown."""
        return min(int(self.frame_slider.value), len(self.frames) - 1)

    def update(self) -> None:
        """Redraw for the current frame slider / confidence threshold / camera toggle."""
        with self._lock:
            i, frame = self.current, self.frames[self.current]
            pts, rgb, _ = frame_points(frame, float(self.conf_slider.value), stride=self.strides[i])
            if len(pts) == 0:  # viser needs at least one point; park an invisible one
                pts, rgb = frame.c2w[None, :3, 3].astype(np.float32), np.zeros((1, 3), np.uint8)
            with self.server.atomic():
                self.points.points = pts.astype(np.float32)
                self.points.colors = rgb
                self.points.point_size = float(self.size_slider.value)
                for j, frustum in enumerate(self.frusta):
                    frustum.color = CURRENT if j == i else OTHER
                    frustum.visible = bool(self.all_cameras.value) or j == i
            threshold = float(self.conf_slider.value)
            self.info.content = (f"frame {frame.index:04d}: {len(pts):,} points "
                                 f"(stride {self.strides[i]}, confidence >= {threshold:.3g})")

    def run(self) -> None:
        """Serve until :meth:`stop`, :meth:`request_stop` (e.g. from a signal handler) or Ctrl-C,
        advancing the frame slider while Play is ticked; the server is shut down on the way out."""
        try:
            while not self._stopped.is_set():
                if self.play.value and len(self.frames) > 1:
                    # Assigning the value runs the slider's callbacks (update) synchronously.
                    self.frame_slider.value = (self.current + 1) % len(self.frames)
                    self._stopped.wait(1.0 / max(float(self.fps.value), 0.5))
                else:
                    self._stopped.wait(0.05)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler: only sets an event)."""
        self._stopped.set()

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        self._stopped.set()
        with self._close_lock:  # not self._lock: a callback's update() may hold it while we wait
            if not self._closed:
                self._closed = True
                self.server.stop()
