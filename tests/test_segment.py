"""Single-image segmentation (``streamtrack segment``) against the official image predictor.

The reference is sam2's own ``SAM2ImagePredictor`` on a model built from the
same seeded random checkpoint through ``build_model(kind="image")``; the only
change made to it is the backbone grid sizes for the 256 test input (it
hard-codes those of a 1024 input).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import PIL.Image
import pytest
from conftest import TEST_IMAGE_SIZE
from PIL import Image

import streamtrack.segment as segment_module
from streamtrack.engine import Prompt
from streamtrack.errors import PromptError, UserError
from streamtrack.models import build_model
from streamtrack.overlay import color_for
from streamtrack.protocol import decode_mask, mask_bbox
from streamtrack.segment import (
    Segmenter,
    SegmentResult,
    as_image,
    check_prompts,
    load_image,
    prompts_from_args,
    render_overlay,
    save_masks_png,
    save_overlay,
    save_rle_json,
)
from streamtrack.synthetic import make_clip

MODEL = "sam2.1_hiera_tiny"


@pytest.fixture(scope="module")
def clip():
    return make_clip(1, 160, 120)


@pytest.fixture(scope="module")
def image(clip):
    return clip.frames[0]


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint, image):
    seg = Segmenter(MODEL, tiny_checkpoint, device="cpu", image_size=TEST_IMAGE_SIZE)
    seg.set_image(image)
    return seg


@pytest.fixture(scope="module")
def official(tiny_checkpoint, image):
    """The official predictor, used as the SAM 2 image tutorial does, on its own model instance."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    model = build_model(MODEL, tiny_checkpoint, device="cpu", image_size=TEST_IMAGE_SIZE, kind="image")
    pred = SAM2ImagePredictor(model)
    s = TEST_IMAGE_SIZE
    pred._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    pred.set_image(image)
    return pred


def _official(pred, prompt: Prompt, multimask: bool):
    """Tutorial flow: predict, then sort best first with np.argsort(scores)[::-1]."""
    masks, scores, logits = pred.predict(
        point_coords=None if prompt.points is None else np.array(prompt.points),
        point_labels=None if prompt.labels is None else np.array(prompt.labels),
        box=None if prompt.box is None else np.array(prompt.box),
        multimask_output=multimask,
    )
    order = np.argsort(scores)[::-1]
    return masks[order].astype(bool), scores[order], logits[order]


def _prompt(kind: str, clip) -> Prompt:
    inside1, inside2 = clip.center(1), clip.center(2)
    if kind == "box":
        return Prompt.make(1, box=clip.box(1))
    if kind == "points":
        return Prompt.make(1, points=[inside1, inside2], labels=[1, 0])
    return Prompt.make(1, box=clip.box(2), points=[inside2, inside1], labels=[1, 0])


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
@pytest.mark.parametrize("kind", ["box", "points", "box+points"])
def test_matches_official_predictor(segmenter, official, clip, kind, multimask):
    prompt = _prompt(kind, clip)
    (result,) = segmenter.predict([prompt], multimask=multimask)
    masks, scores, logits = _official(official, prompt, multimask)
    k = 3 if multimask else 1
    assert result.obj_id == 1
    assert result.masks.shape == (k, 120, 160) and result.masks.dtype == bool
    assert result.scores.shape == (k,) and result.logits.shape == (k, 64, 64)
    assert np.all(np.diff(result.scores) <= 0), "scores must be sorted best first"
    np.testing.assert_array_equal(result.masks, masks)
    np.testing.assert_allclose(result.scores, scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.logits, logits, rtol=0, atol=1e-5)
    assert 0 < result.area < 120 * 160 and result.bbox == mask_bbox(result.masks[0])


def test_segment_embeds_the_image_and_masks_depend_on_the_prompt(tiny_checkpoint, image, official, clip):
    # A fresh Segmenter through segment(): covers set_image as well as predict.
    seg = Segmenter(MODEL, tiny_checkpoint, device="cpu", image_size=TEST_IMAGE_SIZE)
    prompts = [_prompt("points", clip), Prompt.make(2, points=[clip.center(3)])]
    results = seg.segment(image, prompts)
    assert [r.obj_id for r in results] == [1, 2]
    for r, p in zip(results, prompts, strict=True):
        masks, scores, _ = _official(official, p, False)
        np.testing.assert_array_equal(r.masks, masks)
        np.testing.assert_allclose(r.scores, scores, atol=1e-6)
    # The sharpened random weights make masks prompt-dependent, so the equalities above are not vacuous.
    assert (results[0].mask != results[1].mask).mean() > 0.01


def test_batched_boxes_equal_per_box(segmenter, official, clip, monkeypatch):
    prompts = [Prompt.make(i, box=clip.box(i)) for i in (1, 2, 3)]
    calls = []
    real_predict = segmenter.predictor.predict

    def spy(**kwargs):
        calls.append(kwargs)
        return real_predict(**kwargs)

    monkeypatch.setattr(segmenter.predictor, "predict", spy)
    batched = segmenter.predict(prompts)
    assert len(calls) == 1 and calls[0]["box"].shape == (3, 4), "box-only objects go in one call"
    monkeypatch.undo()

    for r, p in zip(batched, prompts, strict=True):
        (single,) = segmenter.predict([p])
        masks, scores, logits = _official(official, p, False)
        assert r.obj_id == p.obj_id
        np.testing.assert_allclose(r.logits, single.logits, rtol=0, atol=1e-4)
        np.testing.assert_allclose(r.logits, logits, rtol=0, atol=1e-4)
        np.testing.assert_allclose(r.scores, single.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(r.scores, scores, rtol=0, atol=1e-5)
        # Thresholding at 0 may flip a pixel whose logit is within float noise of it.
        assert (r.masks != single.masks).mean() < 1e-3
    assert not np.array_equal(batched[0].mask, batched[1].mask)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (Prompt.make(1, points=[[170, 10]]), "point (170, 10) is outside the 160x120 image"),
        (Prompt.make(1, points=[[10, -1]]), "outside"),
        (Prompt.make(1, box=[10, 10, 200, 50]), "box corner (200, 50) is outside"),
        (Prompt.make(1, box=[50, 10, 20, 40]), "x0 < x1"),
        (Prompt.make(1, points=[[10, 10]], labels=[2]), "labels must be 1"),
        (Prompt(1, points=((10.0, 10.0),), labels=(1, 0)), "one label per point"),
        (Prompt(1, points=(), labels=()), "empty point list"),
        (Prompt(1), "needs a box, points"),
        (Prompt.make(0, box=[1, 1, 5, 5]), "positive integer"),
        (Prompt.make(1, mask=np.ones((120, 160), bool)), "mask prompts are not supported"),
        (Prompt.make(1, box=[1, 1, float("nan"), 5]), "finite"),
    ],
)
def test_bad_prompts_are_rejected(segmenter, prompt, message):
    with pytest.raises(PromptError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        segmenter.predict([prompt])
    assert "\n" not in str(e.value)


def test_flipped_views_pil_images_and_generators_are_taken(segmenter, image, clip):
    prompts = [Prompt.make(1, box=clip.box(1))]
    try:
        want = segmenter.segment(np.ascontiguousarray(image[:, ::-1]), prompts)[0]
        for given in (image[:, ::-1], Image.fromarray(np.ascontiguousarray(image[:, ::-1]))):
            got = segmenter.segment(given, (p for p in prompts))[0]  # a generator of prompts too
            assert np.array_equal(got.masks, want.masks) and np.array_equal(got.scores, want.scores)
        alone = segmenter.segment(image[:, ::-1], prompts[0])  # one prompt, as engine.step takes
        assert len(alone) == 1 and np.array_equal(alone[0].masks, want.masks)
        with pytest.raises(PromptError, match="prompts must be a list of Prompt"):
            segmenter.predict({"obj_id": 1, "box": [1, 1, 5, 5]})
    finally:
        segmenter.set_image(image)  # the other tests' image


def test_a_photo_stored_sideways_is_loaded_upright(tmp_path):
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :10] = 255  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: shown turned 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    shown = load_image(tmp_path / "phone.jpg")
    assert shown.shape == (60, 40, 3)
    assert shown[:10, -10:].mean() > 200 and shown[:, :10].mean() < 30  # now top-right


def test_pils_warnings_on_an_image_it_reads_all_the_same_are_not_printed(tmp_path):
    """A palette PNG with its transparency as bytes: PIL warns, and the RGB image is right."""
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(gray, "L").convert("P").save(tmp_path / "p.png", transparency=bytes([0, 128, 255]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = load_image(tmp_path / "p.png")
    assert np.array_equal(loaded, np.repeat(gray[..., None], 3, axis=2))


def test_a_failed_set_image_forgets_the_last_image(tiny_checkpoint, image, clip, monkeypatch):
    seg = Segmenter(MODEL, tiny_checkpoint, device="cpu", image_size=TEST_IMAGE_SIZE)
    seg.set_image(image)

    def fail(_image):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(seg.predictor, "set_image", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        seg.set_image(image[::2, ::2].copy())
    with pytest.raises(RuntimeError, match="call set_image"):  # not the previous image's masks
        seg.predict([Prompt.make(1, box=[1, 1, 20, 20])])
    with pytest.raises(UserError, match="apply only when a model name is given"):
        Segmenter(seg.model, image_size=TEST_IMAGE_SIZE)


def test_the_pil_image_given_to_segment_is_taken_by_the_overlay_too(segmenter, image, clip):
    pil = Image.fromarray(image)
    results = segmenter.segment(pil, [Prompt.make(1, box=clip.box(1))])
    assert np.array_equal(render_overlay(pil, results), render_overlay(image, results))


def test_cli_rle_to_a_stdout_appended_to_a_file_appends(image_png, tiny_checkpoint, tmp_path):
    """`for f in *.jpg; do streamtrack segment $f ... --save-rle /dev/stdout >> all.jsonl` (or
    `--save-rle -`): each
    run adds its line (renamed over, the file kept only the last run's), and the score lines
    go to stderr (stdout is the file). No overlay is asked for: none is written."""
    model = f"--checkpoint {tiny_checkpoint} --image-size {TEST_IMAGE_SIZE} --device cpu"
    log = tmp_path / "all.jsonl"
    log.write_text('{"earlier": true}\n')
    for box, stdout in (("10,10,60,60", "/dev/stdout"), ("20,20,70,70", "-")):
        proc = subprocess.run(f"{sys.executable} -m streamtrack segment {image_png} {model} --box {box} "
                              f"--save-rle {stdout} >> all.jsonl", shell=True, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "object 1: score " in proc.stderr
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0] == {"earlier": True} and len(lines) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all.jsonl"]
    assert [line["objects"][0]["obj_id"] for line in lines[1:]] == [1, 1]


def test_cli_scores_go_to_stderr_when_stdout_is_the_rle_file(image_png, tiny_checkpoint, tmp_path):
    model = f"--checkpoint {tiny_checkpoint} --image-size {TEST_IMAGE_SIZE} --device cpu"
    proc = subprocess.run(f"{sys.executable} -m streamtrack segment {image_png} {model} --box 10,10,60,60 "
                          "--out o.png --save-rle so.json > so.json", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "object 1: score " in proc.stderr, proc.stderr
    assert json.loads((tmp_path / "so.json").read_text())["objects"][0]["obj_id"] == 1


def test_overlay_of_another_images_results_is_refused(segmenter, image, clip):
    result = segmenter.predict([Prompt.make(1, box=clip.box(1))])
    with pytest.raises(UserError, match=r"object 1: its mask is 160x120, the image 80x60"):
        render_overlay(image[::2, ::2].copy(), result)


def test_empty_and_duplicate_prompts_are_rejected():
    with pytest.raises(PromptError, match="no prompt"):
        check_prompts([], 120, 160)
    with pytest.raises(PromptError, match="prompted twice"):
        check_prompts([Prompt.make(1, box=[1, 1, 5, 5]), Prompt.make(1, points=[[3, 3]])], 120, 160)


def test_cli_prompt_rules(tmp_path):
    one = prompts_from_args(["1,2,30,40"], ["5,6", "7,8,0"])
    assert len(one) == 1 and one[0].box == (1, 2, 30, 40)
    assert one[0].points == ((5, 6), (7, 8)) and one[0].labels == (1, 0)
    several = prompts_from_args(["1,2,30,40", "50,2,90,40"], ["5,6"])
    assert [(p.obj_id, p.box is not None, p.points is not None) for p in several] == [
        (1, True, False), (2, True, False), (3, False, True)]
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"obj_id": 4, "frame": 7, "box": [1, 2, 3, 4], "points": [[2, 3]]},
                             {"obj_id": 5, "points": [[1, 1], [9, 9]], "labels": [1, 0]}]))
    from_file = prompts_from_args(None, None, f)
    # Frames are ignored, but give the order: frame 0's entries first.
    assert [p.obj_id for p in from_file] == [5, 4] and from_file[1].points == ((2, 3),)
    with pytest.raises(PromptError, match="object 1 is prompted twice"):
        f.write_text(json.dumps([{"obj_id": 1, "box": [1, 2, 3, 4]}]))
        prompts_from_args(["1,2,30,40"], None, f)


def _ellipse(h: int, w: int, center, axes) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, center, axes, 0, 0, 360, 1, -1)
    return m.astype(bool)


def test_overlay_fills_masks_and_leaves_the_rest(tmp_path, image):
    h, w = image.shape[:2]
    masks = [_ellipse(h, w, (40, 40), (18, 12)), _ellipse(h, w, (115, 80), (15, 20))]
    results = [SegmentResult(i, m[None], np.array([0.9], np.float32)) for i, m in enumerate(masks, 1)]
    prompts = [Prompt.make(1, box=[20, 26, 60, 54]),
               Prompt.make(2, points=[[115, 80], [140, 20]], labels=[1, 0])]
    out = save_overlay(tmp_path / "sub" / "overlay.png", image, results, prompts)
    written = np.array(Image.open(tmp_path / "sub" / "overlay.png"))
    assert written.shape == image.shape and np.array_equal(written, out)

    changed = np.any(written != image, axis=2)
    for m in masks:
        core = cv2.erode(m.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert changed[core].mean() > 0.99, "mask interior is filled"
    # Far = 8 px away from every mask, box outline and point marker.
    drawn = np.zeros((h, w), np.uint8)
    for m in masks:
        drawn |= m
    cv2.rectangle(drawn, (20, 26), (60, 54), 1, 1)
    for x, y in ([115, 80], [140, 20]):
        drawn[max(0, y - 10):y + 11, max(0, x - 10):x + 11] = 1
    far = cv2.dilate(drawn, np.ones((17, 17), np.uint8)) == 0
    assert far.mean() > 0.3
    assert not changed[far].any(), "pixels far from every mask and prompt are unchanged"
    # Prompt markers: the fg star is green, the bg star red, the box outline green.
    assert written[80, 115, 1] > 150 and written[80, 115, 0] < 100
    assert written[20, 140, 0] > 150 and written[20, 140, 1] < 100
    assert written[26, 40, 1] > 150


def test_overlay_of_real_results(segmenter, image, clip):
    prompts = [Prompt.make(1, box=clip.box(1)), Prompt.make(2, box=clip.box(3))]
    r1, r2 = segmenter.predict(prompts)
    # Mask pixels 4+ px from its outer contour (the tutorial borders outer contours only)
    # are beyond the reach of the 2 px antialiased border.
    out = render_overlay(image, [r1])
    outline = np.zeros(r1.mask.shape, np.uint8)
    contours, _ = cv2.findContours(r1.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(outline, contours, -1, 1, 1)
    core = r1.mask & (cv2.dilate(outline, np.ones((7, 7), np.uint8)) == 0)
    assert core.sum() > 100
    expected = 0.5 * image[core].astype(float) + 0.5 * np.array(color_for(1), float)
    assert np.abs(out[core].astype(float) - expected).max() <= 1.0, "0.5 blend with the object's colour"
    # Both objects and their prompt boxes.  Random-weight masks are stripy, so only a few
    # pixels lie 3+ px from every mask; none of them may change.
    out = render_overlay(image, [r1, r2], prompts)
    drawn = (r1.mask | r2.mask).astype(np.uint8)
    for p in prompts:
        cv2.rectangle(drawn, *_corners(p.box), 1, 2)
    far = cv2.dilate(drawn, np.ones((5, 5), np.uint8)) == 0
    assert not np.any(out[far] != image[far])
    assert np.any(out != image, axis=2)[r1.mask | r2.mask].mean() > 0.9


def _corners(box):
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return (x0, y0), (x1, y1)


def test_rle_json_and_mask_pngs_round_trip(segmenter, clip, tmp_path):
    results = segmenter.predict([_prompt("box+points", clip), Prompt.make(2, points=[clip.center(3)])],
                                multimask=True)
    data = save_rle_json(tmp_path / "r.json", results)
    loaded = json.loads((tmp_path / "r.json").read_text())
    assert loaded == data and (loaded["width"], loaded["height"]) == (160, 120)
    assert [o["obj_id"] for o in loaded["objects"]] == [1, 2]
    for r, obj in zip(results, loaded["objects"], strict=True):
        np.testing.assert_array_equal(decode_mask(obj["rle"]), r.mask)
        assert obj["score"] == pytest.approx(r.score)
        assert obj["area"] == int(r.mask.sum()) and tuple(obj["bbox"]) == mask_bbox(r.mask)
        assert len(obj["candidates"]) == 3
        for cand, m, s in zip(obj["candidates"], r.masks, r.scores, strict=True):
            np.testing.assert_array_equal(decode_mask(cand["rle"]), m)
            assert cand["score"] == pytest.approx(float(s))

    paths = save_masks_png(tmp_path / "masks", results)
    assert [p.name for p in paths] == ["object_1.png", "object_2.png"]
    for p, r in zip(paths, results, strict=True):
        png = np.array(Image.open(p))
        assert set(np.unique(png)) <= {0, 255}
        np.testing.assert_array_equal(png == 255, r.mask)
    prefixed = save_masks_png(tmp_path / "out" / "img.png", results[:1])
    assert prefixed == [tmp_path / "out" / "img_object_1.png"] and prefixed[0].is_file()


# ---------------------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamtrack", "segment", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def image_png(image, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("segment") / "image.png"
    Image.fromarray(image).save(path)
    return path


def test_cli_end_to_end(image_png, tiny_checkpoint, segmenter, clip, tmp_path):
    model = ["--checkpoint", str(tiny_checkpoint), "--image-size", str(TEST_IMAGE_SIZE), "--device", "cpu"]
    box, fg, bg = clip.box(2), clip.center(2), clip.center(1)
    cmd = [str(image_png), *model, "--box", ",".join(f"{v:g}" for v in box),
           "--point", f"{fg[0]:g},{fg[1]:g}", "--point", f"{bg[0]:g},{bg[1]:g},0", "--multimask",
           "--out", "o/overlay.png", "--save-masks", "m", "--save-rle", "r.json"]
    proc = _cli(*cmd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no library's deprecation notices either

    # One --box with --points is one object; its 3 scores are printed best first and
    # equal what the Segmenter gives in process on the same pixels.
    (expected,) = segmenter.predict([Prompt.make(1, box=box, points=[fg, bg], labels=[1, 0])], multimask=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("object 1: scores ")
    printed = [float(v) for v in lines[0].split("scores ")[1].split(" (")[0].split()]
    assert printed == sorted(printed, reverse=True)
    np.testing.assert_allclose(printed, expected.scores, atol=1e-4)

    overlay = np.array(Image.open(tmp_path / "o" / "overlay.png"))
    assert overlay.shape == (120, 160, 3)
    rle = json.loads((tmp_path / "r.json").read_text())
    np.testing.assert_array_equal(decode_mask(rle["objects"][0]["rle"]), expected.mask)
    assert np.array_equal(np.array(Image.open(tmp_path / "m" / "object_1.png")) > 0, expected.mask)


def test_cli_rle_to_stdout_is_json_and_a_reader_that_left_costs_no_file(image_png, tiny_checkpoint, tmp_path):
    """`--save-rle /dev/stdout | jq`: the score lines go to stderr then. A reader of stdout
    that is gone (`| true`) costs neither a traceback nor the files. Masks an earlier run
    left in the --save-masks folder are named in a warning."""
    model = ["--checkpoint", str(tiny_checkpoint), "--image-size", str(TEST_IMAGE_SIZE), "--device", "cpu"]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "object_2.png").write_bytes(b"an earlier run's")
    proc = _cli(str(image_png), *model, "--box", "10,10,60,60", "--out", "o.png", "--save-masks", "m",
                "--save-rle", "/dev/stdout", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [o["obj_id"] for o in json.loads(proc.stdout)["objects"]] == [1]
    assert "object 1: score " in proc.stderr
    assert "already holds object_2.png from an earlier run" in proc.stderr, proc.stderr

    quiet = _cli("-q", str(image_png), *model, "--box", "10,10,60,60", "--out", "q.png", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == "", quiet

    reader_gone = subprocess.run(
        f"{sys.executable} -m streamtrack segment {image_png} {' '.join(model)} --box 10,10,60,60 "
        "--out p.png --save-rle p.json | true", shell=True, cwd=tmp_path, capture_output=True,
        text=True, timeout=120)
    assert "Traceback" not in reader_gone.stderr and "Error" not in reader_gone.stderr, reader_gone.stderr
    assert (tmp_path / "p.png").exists() and (tmp_path / "p.json").exists()


def test_a_read_only_array_is_segmented_without_torchs_warning(segmenter, image, clip):
    frozen = image.copy()
    frozen.flags.writeable = False  # as np.asarray(pil_image) gives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (result,) = segmenter.segment(frozen, Prompt.make(1, box=clip.box(1)))
    (expected,) = segmenter.segment(image, Prompt.make(1, box=clip.box(1)))
    assert np.array_equal(result.mask, expected.mask)


BAD_INPUTS = {
    "missing": (["missing.png", "--point", "10,10"], "image missing.png not found"),
    "not-an-image": (["notimage.png", "--point", "10,10"], "is not a readable image"),
    "point-outside": (["IMAGE", "--point", "161,10"], "outside the 160x120 image"),
    "bad-box": (["IMAGE", "--box", "1,2,three,4"], "--box '1,2,three,4'"),
    "directory": (["folder", "--point", "10,10"], "image folder is a directory, not a file"),
    "url": (["http://127.0.0.1:9/x.png", "--point", "10,10"],
            "image http://127.0.0.1:9/x.png: segment reads a local image file, not a URL"),
    "double-slash": (["no//such.png", "--point", "10,10"], "image no//such.png not found"),
    "empty": (["", "--point", "10,10"], "image: empty path"),  # an unset shell variable
    "binary-prompts": (["IMAGE", "--prompts", "IMAGE"], "is not a text file"),
    # --out is "<case>.png": here the input image itself, which must not be overwritten
    "out-is-input": (["out-is-input.png", "--point", "10,10"], "--out out-is-input.png is the input image"),
    # Found before the model is built (the checkpoint does not exist).
    "rle-is-a-folder": (["IMAGE", "--point", "10,10", "--save-rle", "folder"],
                        "--save-rle folder is a directory, not a file"),
}


def test_cli_bad_input_exits_2(image_png, tmp_path):
    # The cases run concurrently: each is mostly interpreter + torch start-up.
    (tmp_path / "notimage.png").write_text("not an image\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "out-is-input.png").write_bytes(image_png.read_bytes())
    procs = {}
    for name, (args, _) in BAD_INPUTS.items():
        args = [str(image_png) if a == "IMAGE" else a for a in args]
        cmd = [sys.executable, "-m", "streamtrack", "segment", *args,
               "--checkpoint", "unused.pt", "--out", f"{name}.png"]
        procs[name] = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        message = BAD_INPUTS[name][1]
        assert proc.returncode == 2, (name, stderr)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("streamtrack: error: "), (name, stderr)
        assert message in lines[0], (name, lines[0])
        if name == "out-is-input":
            assert (tmp_path / f"{name}.png").read_bytes() == image_png.read_bytes()
        else:
            assert not (tmp_path / f"{name}.png").exists()


def test_non_finite_scores_are_written_as_null(image, tmp_path):
    # A checkpoint with NaN weights gives NaN scores; JSON has no NaN.
    masks = np.zeros((3, *image.shape[:2]), bool)
    masks[:, 10:20, 30:50] = True
    result = SegmentResult(1, masks, np.array([np.nan, np.inf, 0.25], np.float32))
    save_rle_json(tmp_path / "r.json", [result])
    (obj,) = json.loads((tmp_path / "r.json").read_text())["objects"]
    assert obj["score"] is None and obj["area"] == 200
    assert [c["score"] for c in obj["candidates"]] == [None, None, 0.25]


def _tiff_i16b(values: np.ndarray, path: Path) -> None:
    Image.frombytes("I;16B", values.shape[::-1], values.astype(">u2").tobytes()).save(path)


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        # 16-bit grayscale PNG, mode I;16: 0..65535 -> 0..255 as value / 257.
        ("i16.png", lambda v, p: Image.fromarray(v).save(p), lambda v: v / 257),
        ("i16b.tif", _tiff_i16b, lambda v: v / 257),
        ("int32.tif", lambda v, p: Image.fromarray(v.astype(np.int32)).save(p), lambda v: v / 257),
        # Beyond 16 bits or negative: the image's own range.
        ("signed.tif", lambda v, p: Image.fromarray(v.astype(np.int32) - 40000).save(p),
         lambda v: (v - v.min()) * 255 / (v.max() - v.min())),
        ("unit.tif", lambda v, p: Image.fromarray((v / 65535).astype(np.float32)).save(p), lambda v: v / 257),
        ("float.tif", lambda v, p: Image.fromarray(v.astype(np.float32) * 7 - 3).save(p),
         lambda v: (v - v.min()) * 255 / (v.max() - v.min())),
    ],
)
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, name, make, expected):
    ramp = np.arange(120 * 160, dtype=np.float64).reshape(120, 160) * 65535 / (120 * 160 - 1)
    values = ramp.astype(np.uint16)
    values[:5] = 0  # black stays black
    make(values, tmp_path / name)
    loaded = load_image(tmp_path / name)
    assert loaded.shape == (120, 160, 3) and loaded.dtype == np.uint8
    assert np.array_equal(loaded[..., 0], loaded[..., 2])
    want = expected(values.astype(np.float64))
    assert abs(loaded.mean() - want.mean()) < 1.0
    assert np.abs(loaded[..., 0] - want).max() <= 1.0
    assert loaded[:5].max() == 0 and loaded[-1, -1, 0] >= 254
    with Image.open(tmp_path / name) as opened:  # given to the library as a PIL image: the same
        assert np.array_equal(as_image(opened), loaded)


def test_an_image_over_pils_size_limit_is_refused_in_one_line(image_png, monkeypatch):
    # 160x120 = 19,200 px: over twice this limit PIL refuses to open the image.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 5000)
    with pytest.raises(UserError, match=r"is too large: 0\.019 Mpx, more than PIL's limit of 0\.01 Mpx; "
                                        r"downscale it") as e:
        load_image(image_png)
    assert "\n" not in str(e.value)


def test_a_large_image_loads_without_pils_warning(image_png, monkeypatch):
    # Over this limit (but not twice it), PIL warns on stderr of a "decompression bomb DOS
    # attack": not for a file the user named.
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 15000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(image_png).shape == (120, 160, 3)


def _files(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def test_a_failed_write_replaces_nothing(segmenter, image, clip, tmp_path):
    prompts = [Prompt.make(1, box=clip.box(1)), Prompt.make(2, box=clip.box(2))]
    results = segmenter.predict(prompts)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "object_1.png").write_bytes(b"earlier mask")
    (tmp_path / "m" / "object_2.png").mkdir()  # cannot be written
    (tmp_path / "keep.png").write_bytes(b"earlier overlay")
    (tmp_path / "old.json").write_text("{}\n")
    (tmp_path / "afile.txt").write_text("a file\n")
    before = _files(tmp_path)

    with pytest.raises(UserError) as e:
        save_masks_png(tmp_path / "m", results)
    assert (tmp_path / "m" / "object_1.png").read_bytes() == b"earlier mask"
    assert re.fullmatch(r"cannot write mask .*object_2\.png: Is a directory", str(e.value))
    # The overlay and the RLE file are not written either when a mask's folder cannot be made.
    with pytest.raises(UserError, match=r"cannot write mask .*afile\.txt/new/object_1\.png: Not a directory"):
        segment_module.save_outputs(tmp_path / "keep.png", image, results, prompts,
                                    masks=tmp_path / "afile.txt" / "new/", rle=tmp_path / "old.json")
    # Nor are the folders made for the files before the one that fails left behind.
    with pytest.raises(UserError, match=r"cannot write RLE file .*/m: Is a directory"):
        segment_module.save_outputs(tmp_path / "new" / "o.png", image, results, prompts,
                                    masks=tmp_path / "new" / "m/", rle=tmp_path / "m")
    assert _files(tmp_path) == before, "no file replaced, no temporary file or new folder left"

    segment_module.save_outputs(tmp_path / "keep.png", image, results, prompts,
                                masks=tmp_path / "new" / "m/", rle=tmp_path / "old.json")
    overlay = np.array(Image.open(tmp_path / "keep.png"))
    assert np.array_equal(overlay, render_overlay(image, results, prompts))
    assert [o["obj_id"] for o in json.loads((tmp_path / "old.json").read_text())["objects"]] == [1, 2]
    for r in results:
        assert np.array_equal(np.array(Image.open(tmp_path / "new" / "m" / f"object_{r.obj_id}.png")) > 0,
                              r.mask)
    assert sorted(p.name for p in tmp_path.rglob("*.tmp")) == []


def test_an_output_that_is_a_pipe_or_a_device_is_written_into_not_replaced(segmenter, image, clip, tmp_path):
    """--save-rle /dev/stdout, a named pipe: renaming a file over them would replace them."""
    import os
    import threading

    results = segmenter.predict([Prompt.make(1, box=clip.box(1))])
    fifo = tmp_path / "rle.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    segment_module.save_outputs(tmp_path / "o.png", image, results, masks=None, rle=fifo)
    reader.join(10)
    assert fifo.is_fifo() and [o["obj_id"] for o in json.loads(got[0])["objects"]] == [1]


OUTPUT_MISTAKES = {
    "out-unknown-extension": (["--out", "x.xyz"], "--out x.xyz has unknown image extension '.xyz'"),
    "out-no-extension": (["--out", "noext"], "--out noext has no extension"),
    "out-read-only-format": (["--out", "x.psd"], "--out x.psd: cannot write an RGB PSD image"),
    "out-directory": (["--out", "folder"], "--out folder is a directory, not a file"),
    "out-under-a-file": (["--out", "afile.txt/o.png"],
                         "--out afile.txt/o.png: afile.txt is a file, not a folder"),
    "rle-directory": (["--out", "keep.png", "--save-rle", "folder"], "--save-rle folder is a directory"),
    "masks-a-file": (["--out", "keep.png", "--save-masks", "keep.json"], "--save-masks keep.json is a file"),
    "masks-overwrite-the-input": (
        ["--out", "o.png", "--save-masks", "sm"],
        "--save-masks file sm/object_1.png is the input image, which it would overwrite"),
    "out-is-rle": (["--out", "keep.png", "--save-rle", "./keep.png"],
                   "--out keep.png and --save-rle keep.png are the same file"),
    "out-is-a-mask": (["--out", "m/object_1.png", "--save-masks", "m"],
                      "--out m/object_1.png and --save-masks file m/object_1.png are the same file"),
    # an unset shell variable is not "." (masks written into the current folder)
    "masks-empty": (["--out", "o.png", "--save-masks", ""], "--save-masks: empty path"),
    "out-empty": (["--out", ""], "--out: empty path"),
    "rle-empty": (["--out", "o.png", "--save-rle", " "], "--save-rle: empty path"),
    "rle-is-the-checkpoint": (["--out", "o.png", "--save-rle", "ck.pt", "--checkpoint", "ck.pt"],
                              "--save-rle ck.pt is the model's checkpoint, which it would overwrite"),
    "checkpoint-empty": (["--out", "o.png", "--checkpoint", ""], "--checkpoint: empty path"),
    "rle-is-the-prompts": (["--out", "o.png", "--prompts", "p.json", "--save-rle", "./p.json"],
                           "--save-rle p.json is the prompts file, which it would overwrite"),
    "no-output": ([], "nothing to write: give --out OUT.png (the overlay), --save-masks DIR or --save-rle"),
    # Path() drops the separator: the file would be written as "newdir".
    "rle-a-folder-to-be": (["--out", "o.png", "--save-rle", "newdir/"],
                           "--save-rle newdir/ ends in a separator, naming a folder: give a file name"),
    "out-a-folder-to-be": (["--out", "o.png/"], "--out o.png/ ends in a separator"),
    # ICO keeps at most 256 pixels a side, ICNS scales to 1024x1024.
    "out-icon": (["--out", "o.ico"],
                 "--out o.ico: cannot write an RGB ICO image (it does not keep the image's size)"),
    "out-mac-icon": (["--out", "o.icns"], "--out o.icns: cannot write an RGB ICNS image"),
}


@pytest.mark.parametrize("case", OUTPUT_MISTAKES)
def test_cli_output_mistakes_are_refused_before_the_model_is_built(case, image_png, tmp_path, monkeypatch):
    from streamtrack.cli import _cmd_segment, build_parser

    def no_model(*args, **kwargs):
        pytest.fail("the model was built")

    monkeypatch.setattr(segment_module, "Segmenter", no_model)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile.txt").write_text("a file\n")
    (tmp_path / "keep.png").write_bytes(b"earlier overlay")
    (tmp_path / "keep.json").write_text("{}\n")
    (tmp_path / "p.json").write_text('[{"obj_id": 2, "box": [1, 2, 30, 40]}]\n')
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "object_1.png").write_bytes(image_png.read_bytes())
    before = _files(tmp_path)
    options, message = OUTPUT_MISTAKES[case]
    image = "sm/object_1.png" if case == "masks-overwrite-the-input" else str(image_png)
    args = build_parser().parse_args(["segment", image, "--box", "10,10,60,60", *options])
    with pytest.raises(UserError) as e:
        _cmd_segment(args)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert _files(tmp_path) == before


def test_an_output_under_a_folder_that_cannot_be_looked_into_is_one_line(tmp_path, monkeypatch):
    """pathlib raises PermissionError from is_dir()/exists() below a folder without its x
    bit (root, who runs the tests, is never refused: the refusal is simulated)."""
    from streamtrack.outputs import JsonlWriter, VideoWriter
    from streamtrack.segment import check_output_paths

    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if "locked" in self.parts[:-1]:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    (tmp_path / "locked").mkdir()
    locked = tmp_path / "locked"
    expected = "permission denied (a folder on the way cannot be looked into)"
    for what, check in (("--out", lambda: check_output_paths(locked / "o.png")),
                        ("--save-rle", lambda: check_output_paths(None, rle=locked / "sub" / "o.json")),
                        ("--save-masks", lambda: check_output_paths(None, masks=locked / "m", obj_ids=[1])),
                        ("--save-jsonl", lambda: JsonlWriter(locked / "r.jsonl")),
                        ("--save-video", lambda: VideoWriter(locked / "sub" / "r.mp4"))):
        with pytest.raises(UserError) as e:
            check()
        assert str(e.value).startswith(what) and str(e.value).endswith(expected), str(e.value)
