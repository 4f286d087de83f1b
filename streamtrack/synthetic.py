"""Synthetic test clips with exact ground-truth masks.

Textured shapes move over a textured background and pass in front of each
other, so a tracker sees motion, occlusion and texture, and every frame has a
known per-object visible mask. Used by the tests, the benchmarks and to make
the sample clip in ``demos/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class ShapeTrack:
    """One object: a shape with its own texture moving on a straight, bouncing path."""

    obj_id: int
    kind: str  # "ellipse" | "rect" | "triangle"
    size: tuple[int, int]  # half-width, half-height in pixels
    start: tuple[float, float]
    velocity: tuple[float, float]  # pixels per frame
    color: tuple[int, int, int]


@dataclass
class SyntheticClip:
    frames: list[np.ndarray]  # RGB uint8 (H, W, 3)
    masks: dict[int, list[np.ndarray]]  # obj_id -> visible bool mask per frame
    fps: float = 30.0
    tracks: list[ShapeTrack] = field(default_factory=list)

    @property
    def height(self) -> int:
        return self.frames[0].shape[0]

    @property
    def width(self) -> int:
        return self.frames[0].shape[1]

    def box(self, obj_id: int, frame: int = 0) -> list[float]:
        """Tight box [x0, y0, x1, y1] of the object's visible mask."""
        ys, xs = np.nonzero(self.masks[obj_id][frame])
        return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]

    def center(self, obj_id: int, frame: int = 0) -> list[float]:
        """A point inside the object (the visible pixel closest to its mask's centroid)."""
        ys, xs = np.nonzero(self.masks[obj_id][frame])
        i = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
        return [float(xs[i]), float(ys[i])]


def _texture(rng: np.random.Generator, h: int, w: int, base, scale: int) -> np.ndarray:
    noise = rng.random((max(2, h // scale), max(2, w // scale), 3)).astype(np.float32)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
    tex = np.asarray(base, np.float32)[None, None] * (0.55 + 0.45 * noise)
    return np.clip(tex, 0, 255).astype(np.uint8)


def _shape_mask(track: ShapeTrack, center: tuple[int, int], h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    cx, cy = center
    ax, ay = track.size
    if track.kind == "ellipse":
        cv2.ellipse(mask, (cx, cy), (ax, ay), 0, 0, 360, 1, -1)
    elif track.kind == "rect":
        cv2.rectangle(mask, (cx - ax, cy - ay), (cx + ax, cy + ay), 1, -1)
    elif track.kind == "triangle":
        pts = np.array([[cx, cy - ay], [cx - ax, cy + ay], [cx + ax, cy + ay]], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    else:
        raise ValueError(f"unknown shape kind {track.kind!r}")
    return mask.astype(bool)


def _bounce(p: float, v: float, t: int, lo: float, hi: float) -> float:
    span = hi - lo
    x = (p - lo + v * t) % (2 * span)
    return lo + (x if x <= span else 2 * span - x)


def default_tracks(width: int, height: int) -> list[ShapeTrack]:
    s = min(width, height)
    return [
        ShapeTrack(1, "ellipse", (s // 8, s // 10), (width * 0.25, height * 0.35),
                   (s / 90, s / 160), (220, 60, 50)),
        ShapeTrack(2, "rect", (s // 10, s // 9), (width * 0.7, height * 0.65),
                   (-s / 80, -s / 220), (40, 170, 230)),
        ShapeTrack(3, "triangle", (s // 9, s // 9), (width * 0.5, height * 0.25),
                   (-s / 200, s / 120), (60, 210, 70)),
    ]


def make_clip(
    num_frames: int = 32,
    width: int = 256,
    height: int = 192,
    *,
    num_objects: int = 3,
    seed: int = 0,
    fps: float = 30.0,
) -> SyntheticClip:
    """Render a clip; objects later in the list are drawn on top (occlusion)."""
    rng = np.random.default_rng(seed)
    tracks = default_tracks(width, height)[:num_objects]
    background = _texture(rng, height, width, (150, 140, 120), 6)
    # Stripes give the background structure the encoder can latch on to.
    background[:, :: max(4, width // 24)] //= 2
    textures = {t.obj_id: _texture(rng, height, width, t.color, 3) for t in tracks}
    frames: list[np.ndarray] = []
    masks: dict[int, list[np.ndarray]] = {t.obj_id: [] for t in tracks}
    for i in range(num_frames):
        frame = background.copy()
        full = {}
        for t in tracks:
            ax, ay = t.size
            cx = _bounce(t.start[0], t.velocity[0], i, ax, width - 1 - ax)
            cy = _bounce(t.start[1], t.velocity[1], i, ay, height - 1 - ay)
            full[t.obj_id] = _shape_mask(t, (round(cx), round(cy)), height, width)
            frame[full[t.obj_id]] = textures[t.obj_id][full[t.obj_id]]
        for k, t in enumerate(tracks):
            visible = full[t.obj_id].copy()
            for above in tracks[k + 1 :]:
                visible &= ~full[above.obj_id]
            masks[t.obj_id].append(visible)
        frames.append(frame)
    return SyntheticClip(frames=frames, masks=masks, fps=fps, tracks=tracks)


def write_video(frames: list[np.ndarray], path: str | Path, fps: float = 30.0, gop: int = 10,
                crf: int = 18) -> Path:
    """Encode RGB frames as H.264 (yuv420p) with a short GOP, for seeking and reconnect tests."""
    from fractions import Fraction

    import av

    from streamtrack.sources import ffmpeg_file

    path = Path(path)
    h, w = frames[0].shape[:2]
    with av.open(ffmpeg_file(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": str(gop), "crf": str(crf), "preset": "veryfast", "bf": "0"}
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(rgb[: stream.height, : stream.width], format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path
