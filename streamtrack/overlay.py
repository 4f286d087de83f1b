"""Mask overlays in the look of the SAM 2 tutorial: ~0.5 fill, smoothed white borders.

``annotate(image, objects)`` draws onto a copy of an RGB image; only the
pixels inside each object's bounding box (and its label's text box, just above
it) are touched, so cost scales with the objects' size, not the frame's.
``draw_points`` and ``draw_boxes`` add the tutorial's prompt markers (green/red
stars, green box outlines).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from streamtrack.protocol import mask_bbox

# A fixed palette (tab10-like, RGB) indexed by object id: an object keeps its colour.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


def color_for(obj_id: int) -> tuple[int, int, int]:
    return PALETTE[(obj_id - 1) % len(PALETTE)]


@dataclass(frozen=True)
class Annotation:
    """What the overlay needs of one object; engine and wire results both convert to it."""

    obj_id: int
    mask: np.ndarray | None  # bool (H, W)
    bbox: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 (exclusive)
    score: float | None = None
    label: str | None = None


def random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random RGB colour, as the tutorial's ``show_mask(random_color=True)``."""
    return tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[return-value]


def annotate(
    image: np.ndarray,
    objects: Iterable[Annotation],
    *,
    alpha: float = 0.5,
    borders: bool = True,
    boxes: bool = False,
    labels: bool = True,
    random_colors: bool = False,
    seed: int | None = None,
    border_width: int = 1,
) -> np.ndarray:
    """Return a copy of ``image`` (RGB uint8) with each object's mask drawn on it.

    Colours come from :data:`PALETTE` by object id, or, with ``random_colors``,
    from a generator seeded with ``seed`` (None = a different look each call).
    An object without a ``bbox`` gets its mask's; a mask must have the image's size.
    """
    out = image.copy()
    rng = np.random.default_rng(seed) if random_colors else None
    for obj in objects:
        if obj.mask is None:
            continue
        if obj.mask.shape != out.shape[:2]:
            raise ValueError(f"object {obj.obj_id}: mask shape {obj.mask.shape} does not match "
                             f"the image's {out.shape[:2]}")
        bbox = obj.bbox if obj.bbox is not None else mask_bbox(obj.mask)
        if bbox is None:  # an empty mask
            continue
        x0, y0, x1, y1 = (int(v) for v in bbox)
        color = random_color(rng) if rng is not None else color_for(obj.obj_id)
        roi = out[y0:y1, x0:x1]
        m = np.asarray(obj.mask[y0:y1, x0:x1], dtype=bool)
        visible = bool(m.any())
        if visible:
            # Blend the whole box with OpenCV (SIMD, uint8 in and out), then keep the
            # blended pixels only under the mask: cheaper than float math on roi[m].
            solid = np.empty_like(roi)
            solid[:] = color
            blended = cv2.addWeighted(roi, 1.0 - alpha, solid, alpha, 0.0)
            np.copyto(roi, blended, where=m[..., None])
        if borders and visible:
            contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            # Smoothed as in the tutorial's show_mask(borders=True).
            contours = [cv2.approxPolyDP(c, epsilon=0.01, closed=True) for c in contours]
            cv2.drawContours(roi, contours, -1, (255, 255, 255), border_width, lineType=cv2.LINE_AA)
        if boxes:
            cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), color, 1)
        if labels:
            text = obj.label or (f"{obj.obj_id}" if obj.score is None else f"{obj.obj_id} {obj.score:.2f}")
            cv2.putText(out, text, (x0, max(10, y0 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                        color, 1, cv2.LINE_AA)
    return out


def draw_boxes(image: np.ndarray, boxes, color: tuple[int, int, int] = (0, 200, 0),
               thickness: int = 2) -> np.ndarray:
    """Prompt boxes [x0, y0, x1, y1] as outlines, green as the tutorial's show_box (in place)."""
    for box in boxes:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        cv2.rectangle(image, (x0, y0), (x1, y1), color, thickness, lineType=cv2.LINE_AA)
    return image


def draw_points(image: np.ndarray, points, labels, size: int = 12) -> np.ndarray:
    """Foreground points as green stars, background as red stars (in place)."""
    for (x, y), lab in zip(points, labels, strict=True):
        color = (0, 200, 0) if lab == 1 else (220, 0, 0)
        cv2.drawMarker(image, (int(x), int(y)), (255, 255, 255), cv2.MARKER_STAR, size + 3, 3)
        cv2.drawMarker(image, (int(x), int(y)), color, cv2.MARKER_STAR, size, 2)
    return image
