"""Overlay drawing, pixel by pixel: fill blend, borders, labels, colours, prompt markers.

Expected pixels are computed here from the definitions (a 0.5 blend rounded to the
nearest integer, ties to even as OpenCV's saturating casts do; the contour of the
mask; the text box of the label), never by calling the overlay's own helpers.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from streamtrack.overlay import PALETTE, Annotation, annotate, color_for, draw_boxes, draw_points

H, W = 120, 200
GREY = 128
FONT, FONT_SCALE = cv2.FONT_HERSHEY_SIMPLEX, 0.4  # the label font the overlay documents


def grey():
    return np.full((H, W, 3), GREY, np.uint8)


def textured(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def rect_mask(x0, y0, x1, y1):
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def disc_mask(cx, cy, r):
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def bbox(mask):
    """Tight box, x1/y1 exclusive (as the engine and the wire give it)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def anno(obj_id, mask, score=None, label=None):
    return Annotation(obj_id, mask, bbox(mask), score, label)


def blend(image, color):
    """round(0.5 * image + 0.5 * color), per pixel and channel, ties to even."""
    return np.round(0.5 * image.astype(np.float64) + 0.5 * np.asarray(color, np.float64)).astype(np.uint8)


def changed(out, image):
    return np.any(out != image, axis=2)


def label_rect(text, box, margin=1):
    """Where a label may draw: its text box at (x0, max(10, y0 - 3)), plus anti-aliasing."""
    (tw, th), base = cv2.getTextSize(text, FONT, FONT_SCALE, 1)
    x, y = box[0], max(10, box[1] - 3)
    return x - margin, y - th - margin, x + tw + margin, y + base


def region(rect):
    m = np.zeros((H, W), bool)
    x0, y0, x1, y1 = rect
    m[max(0, y0):max(0, y1 + 1), max(0, x0):max(0, x1 + 1)] = True
    return m


def box_region(box):
    m = np.zeros((H, W), bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    return m


RECT = rect_mask(20, 40, 80, 90)
DISC = disc_mask(140, 65, 28)


@pytest.mark.parametrize("make_image", [grey, textured])
def test_fill_is_the_exact_half_blend_and_nothing_else_changes(make_image):
    image = make_image()
    before = image.copy()
    out = annotate(image, [anno(1, RECT), anno(2, DISC)], borders=False, labels=False)
    assert np.array_equal(image, before), "annotate draws on a copy"
    for obj_id, mask in ((1, RECT), (2, DISC)):
        want = blend(image[mask], color_for(obj_id))
        assert np.array_equal(out[mask], want), f"object {obj_id} fill"
        assert (out[mask] != image[mask]).any()
    outside = ~(RECT | DISC)
    assert np.array_equal(out[outside], image[outside]), "pixels outside the masks are untouched"


def test_grey_fill_values_known_by_hand():
    out = annotate(grey(), [anno(1, RECT)], borders=False, labels=False)
    c = np.array(PALETTE[0], float)
    # (128 + c) / 2 with .5 ties going to the even neighbour.
    want = [int(np.round((GREY + v) / 2)) for v in c]
    assert out[60, 50].tolist() == want
    assert out[60, 50].tolist() != [GREY] * 3


def test_alpha_is_a_parameter():
    image = textured(3)
    out = annotate(image, [anno(4, DISC)], alpha=0.25, borders=False, labels=False)
    want = 0.75 * image[DISC].astype(float) + 0.25 * np.array(color_for(4), float)
    assert np.abs(out[DISC].astype(float) - want).max() <= 1.0


@pytest.mark.parametrize("mask", [RECT, DISC], ids=["rect", "disc"])
def test_border_runs_along_the_mask_contour(mask):
    image = grey()
    obj = anno(3, mask)
    plain = annotate(image, [obj], borders=False, labels=False)
    out = annotate(image, [obj], borders=True, labels=False)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = np.concatenate([c[:, 0] for c in contours])
    on = out[pts[:, 1], pts[:, 0]].astype(int)
    fill = plain[pts[:, 1], pts[:, 0]].astype(int)
    # White, anti-aliased: every contour pixel is near white, far brighter than the fill.
    assert on.min() >= 200, on.min()
    # White, not a tint: each channel moves the same share of the way from fill to 255.
    share = (on - fill) / np.maximum(255 - fill, 1)
    assert share.min() >= 0.75 and (share.max(axis=1) - share.min(axis=1)).max() <= 0.06
    assert (on.sum(axis=1) - fill.sum(axis=1)).min() >= 150
    # The border is thin: two pixels inside the contour the fill is exact again...
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    assert inner.sum() > 500
    assert np.array_equal(out[inner], plain[inner])
    # ...and it never reaches more than one pixel outside the mask, nor outside the box.
    near = cv2.dilate(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    touched = changed(out, image)
    assert not (touched & ~near).any()
    assert not (touched & ~box_region(obj.bbox)).any()


def test_label_is_drawn_in_its_text_box_in_the_objects_colour():
    image = grey()
    obj = anno(2, RECT, score=0.87)
    out = annotate(image, [obj], borders=False, labels=True)
    no_label = annotate(image, [obj], borders=False, labels=False)
    rect = label_rect("2 0.87", obj.bbox)
    assert rect[3] < obj.bbox[1], "the label sits above the box"
    text = changed(out, no_label)
    assert text.sum() > 40, "text is drawn"
    assert not (text & ~region(rect)).any(), "label pixels stay inside the label's text box"
    ys, xs = np.nonzero(text)
    # As wide as the string: a wrong or missing score would change the width.
    (tw, _), _ = cv2.getTextSize("2 0.87", FONT, FONT_SCALE, 1)
    assert abs((xs.max() - xs.min() + 1) - tw) <= 3
    # Anti-aliased text in the object's colour: each pixel lies between grey and that colour.
    c = np.array(color_for(2), float)
    px = out[text].astype(float)
    a = ((px - GREY) @ (c - GREY)) / ((c - GREY) @ (c - GREY))
    assert np.abs(px - (GREY + a[:, None] * (c - GREY))).max() <= 2.0
    assert (a > 0.9).sum() >= 5
    # A given label replaces id and score.
    out2 = annotate(image, [anno(2, RECT, score=0.87, label="person")], borders=False)
    text2 = changed(out2, no_label)
    rect2 = label_rect("person", obj.bbox)
    assert not (text2 & ~region(rect2)).any()
    (tw2, _), _ = cv2.getTextSize("person", FONT, FONT_SCALE, 1)
    assert abs((np.ptp(np.nonzero(text2)[1]) + 1) - tw2) <= 3


def test_label_of_an_object_at_the_top_edge_stays_in_the_image():
    mask = rect_mask(60, 0, 120, 30)
    image = grey()
    obj = anno(1, mask, score=0.5)
    out = annotate(image, [obj], borders=False)
    text = changed(out, annotate(image, [obj], borders=False, labels=False))
    assert text.any()
    assert not (text & ~region(label_rect("1 0.50", obj.bbox))).any()


def test_only_boxes_and_labels_of_the_objects_are_touched():
    image = textured(1)
    objs = [anno(1, RECT, score=0.9), anno(2, DISC, score=0.42), anno(5, disc_mask(60, 20, 8), score=1.0)]
    out = annotate(image, objs, boxes=True)
    allowed = np.zeros((H, W), bool)
    for o in objs:
        allowed |= box_region(o.bbox)
        allowed |= region(label_rect(f"{o.obj_id} {o.score:.2f}", o.bbox))
    touched = changed(out, image)
    assert not (touched & ~allowed).any()
    assert np.array_equal(out[~allowed], image[~allowed])
    # boxes=True: a one-pixel outline in the object's colour on the box's edge.
    x0, y0, x1, y1 = objs[1].bbox
    c = np.array(color_for(2), np.uint8)
    edge = np.concatenate([out[y1 - 1, x0:x1], out[y0 + 1:y1, x0], out[y0 + 1:y1, x1 - 1]])
    assert (edge == c).all()


def test_same_id_same_colour_whatever_the_other_objects():
    image = grey()
    a = disc_mask(40, 60, 20)
    b = rect_mask(90, 30, 120, 90)
    c = disc_mask(160, 60, 25)
    runs = [
        annotate(image, [anno(2, b)], labels=False, borders=False),
        annotate(image, [anno(1, a), anno(2, b), anno(3, c)], labels=False, borders=False),
        annotate(image, [anno(3, c), anno(2, b)], labels=False, borders=False),
        annotate(image, [anno(9, a), anno(2, b), anno(7, c)], labels=False, borders=False),
    ]
    for out in runs[1:]:
        assert np.array_equal(out[b], runs[0][b])
    # Twice the same call: the same image.
    assert np.array_equal(runs[1], annotate(image, [anno(1, a), anno(2, b), anno(3, c)],
                                            labels=False, borders=False))


def test_the_first_palette_ids_get_distinct_colours():
    n = len(PALETTE)
    assert n >= 8
    colours = {color_for(i) for i in range(1, n + 1)}
    assert len(colours) == n
    # Distinct on screen too: the blended fills of ids 1..n differ pairwise.
    fills = set()
    for i in range(1, n + 1):
        out = annotate(grey(), [anno(i, RECT)], labels=False, borders=False)
        fills.add(tuple(out[60, 50].tolist()))
    assert len(fills) == n
    # Ids beyond the palette cycle through it rather than failing.
    assert color_for(n + 1) == color_for(1)


def test_objects_without_a_mask_or_with_an_empty_one_are_skipped():
    image = textured(2)
    empty = np.zeros_like(RECT)
    out = annotate(image, [Annotation(1, None, (0, 0, 10, 10), 0.9), Annotation(2, empty, None, 0.9)])
    assert np.array_equal(out, image)


def test_an_object_without_a_box_gets_its_masks():
    image = textured(2)
    assert np.array_equal(annotate(image, [Annotation(2, RECT, None, 0.9)]),
                          annotate(image, [anno(2, RECT, 0.9)]))
    assert not np.array_equal(annotate(image, [Annotation(2, RECT, None, 0.9)]), image)


def test_a_mask_of_another_size_is_refused():
    with pytest.raises(ValueError, match=r"object 3: mask shape \(\d+, \d+\) does not match"):
        annotate(textured(2), [Annotation(3, RECT.T.copy(), None, 0.9)])


def test_random_colours_are_reproducible_with_a_seed():
    image = grey()
    objs = [anno(1, RECT), anno(2, DISC)]
    a = annotate(image, objs, random_colors=True, seed=7, labels=False)
    b = annotate(image, objs, random_colors=True, seed=7, labels=False)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, annotate(image, objs, labels=False))


def test_point_markers_green_foreground_red_background():
    image = grey()
    pts, labels = [(40, 50), (150, 70)], [1, 0]
    out = draw_points(image.copy(), pts, labels)
    assert out[50, 40].tolist() == [0, 200, 0]
    assert out[70, 150].tolist() == [220, 0, 0]
    touched = changed(out, image)
    yy, xx = np.mgrid[:H, :W]
    near = np.zeros((H, W), bool)
    for x, y in pts:
        near |= (np.abs(xx - x) <= 10) & (np.abs(yy - y) <= 10)
        # A white outline keeps the star visible on any background.
        around = out[y - 10:y + 11, x - 10:x + 11].reshape(-1, 3)
        assert (around == 255).all(axis=1).sum() >= 10
    assert touched.sum() > 60
    assert not (touched & ~near).any(), "markers stay at their points"
    colours = {tuple(v) for v in out[touched].tolist()}
    assert colours <= {(0, 200, 0), (220, 0, 0), (255, 255, 255)}


def test_draw_boxes_outlines_the_prompt_box():
    image = grey()
    out = draw_boxes(image.copy(), [(30, 20, 90, 70)], thickness=1)
    touched = changed(out, image)
    assert touched[20, 40:80].all() and touched[70, 40:80].all()
    assert touched[30:60, 30].all() and touched[30:60, 90].all()
    assert not touched[25:65, 35:85].any(), "an outline, not a fill"
    assert not (touched & ~box_region((29, 19, 92, 72))).any()
