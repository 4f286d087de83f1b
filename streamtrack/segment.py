"""Single-image SAM 2 segmentation: the flow of the official SAM 2 image tutorial.

``Segmenter`` wraps the official ``SAM2ImagePredictor`` around a model built by
:func:`streamtrack.models.build_model` (``kind="image"``), so it uses the same
registry and checkpoint loader as the tracker.  One image is embedded once
(``set_image``); each object is one prompt (a box, points with labels, or a box
with points); several box-only objects go through the predictor as one batched
``predict(box=Nx4)`` call, as in the tutorial's batched boxes.

Output helpers write the tutorial-style overlay, one 0/255 PNG per object and a
COCO-RLE JSON file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamtrack.engine import Prompt, check_prompt, without_negative_strides
from streamtrack.errors import PromptError, UserError, existing_file
from streamtrack.models import DEFAULT_MODEL, build_model, resolve_device
from streamtrack.overlay import Annotation, annotate, draw_boxes, draw_points
from streamtrack.protocol import encode_mask, mask_area, mask_bbox


@dataclass(frozen=True, eq=False)
class SegmentResult:
    """Masks of one object, best first.

    ``masks`` is bool (K, H, W) at image resolution, ``scores`` SAM 2's predicted
    IoU per mask (K,), sorted descending; K = 3 with multimask output, else 1.
    ``logits`` are the matching low-resolution mask logits (K, h, w), the
    predictor's ``mask_input`` format for a follow-up prompt.
    """

    obj_id: int
    masks: np.ndarray
    scores: np.ndarray
    logits: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.masks[0]

    @property
    def score(self) -> float:
        return float(self.scores[0])

    @property
    def bbox(self) -> tuple[int, int, int, int] | None:
        return mask_bbox(self.mask)

    @property
    def area(self) -> int:
        return mask_area(self.mask)


def feature_sizes(image_size: int) -> list[tuple[int, int]]:
    """Backbone feature grids the image predictor reshapes to, for any input size.

    ``SAM2ImagePredictor`` hard-codes the grids of a 1024 input (256, 128, 64);
    the Hiera trunk + FPN neck (with the lowest level dropped, ``scalp=1``) gives
    strides 4, 8 and 16, so any other ``--image-size`` needs these instead.
    """
    return [(image_size // s, image_size // s) for s in (4, 8, 16)]


def make_predictor(model: torch.nn.Module, **kwargs):
    """The official ``SAM2ImagePredictor`` on ``model``, fixed up for the model's input size."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    with warnings.catch_warnings():
        # sam2 scripts its transforms with torch.jit.script, which torch now deprecates: its
        # concern, and two lines of stderr on every segment run otherwise.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script. is deprecated",
                                category=FutureWarning)
        predictor = SAM2ImagePredictor(model, **kwargs)
    predictor._bb_feat_sizes = feature_sizes(model.image_size)
    return predictor


def as_image(image) -> np.ndarray:
    """``image`` as a numpy array torch can wrap: a PIL image is converted to RGB, a view
    with negative strides (``bgr[..., ::-1]``) is copied.  Checked by :func:`check_image`."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"))  # writable: torch warns on read-only arrays
    return without_negative_strides(image)


def check_image(image: np.ndarray) -> tuple[int, int]:
    """Return (H, W) of an RGB uint8 image, or raise ``UserError``."""
    if not isinstance(image, np.ndarray):
        raise UserError(f"an image must be a numpy array or PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise UserError(f"an image must be RGB uint8 of shape (H, W, 3), got {image.shape} {image.dtype}")
    return image.shape[0], image.shape[1]


def check_prompts(objects: Sequence[Prompt], height: int, width: int) -> None:
    """Validate every prompt against an image of ``width`` x ``height`` pixels.

    Raises ``PromptError`` with a one-line message naming the object.  Points and
    box corners may lie on the image edge (x = W), as in the tracker.
    """
    if not objects:
        raise PromptError("no prompt given: each object needs a box, points, or both")
    seen: set[int] = set()
    for p in objects:
        if not isinstance(p, Prompt):
            raise PromptError(f"objects must be Prompt instances, got {type(p).__name__}")
        oid = p.obj_id
        if not isinstance(oid, (int, np.integer)) or isinstance(oid, bool) or oid < 1:
            raise PromptError(f"object id must be a positive integer, got {oid!r}")
        if oid in seen:
            raise PromptError(f"object {oid} is prompted twice; put its box and points in one prompt")
        seen.add(oid)
        if p.mask is not None:
            raise PromptError(f"object {oid}: mask prompts are not supported for a single image; "
                              "give a box or points")
        check_prompt(p, height, width, "image")


class Segmenter:
    """SAM 2 on one image at a time, through the official ``SAM2ImagePredictor``.

    ``model`` is a registry name (built with ``checkpoint``, ``device`` and
    ``image_size``) or an already built image model (``build_model(kind="image")``),
    used on the device it is on.
    """

    def __init__(
        self,
        model: str | torch.nn.Module = DEFAULT_MODEL,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "auto",
        image_size: int | None = None,
        *,
        mask_threshold: float = 0.0,
        bf16: bool = True,
    ):
        if isinstance(model, torch.nn.Module):
            if checkpoint is not None or image_size is not None:
                raise UserError("checkpoint and image_size apply only when a model name is given")
        else:
            dev = device if isinstance(device, torch.device) else resolve_device(device)
            model = build_model(model, checkpoint, device=dev, image_size=image_size, kind="image")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.image_size: int = model.image_size
        self.bf16 = bf16
        self.predictor = make_predictor(model, mask_threshold=mask_threshold)
        self._hw: tuple[int, int] | None = None

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs) -> Segmenter:
        return cls(model, **kwargs)

    def _autocast(self):
        # The tutorial runs the image predictor under bfloat16 autocast on CUDA; CPU stays float32.
        enabled = self.device.type == "cuda" and self.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.inference_mode()
    def set_image(self, image_rgb: np.ndarray) -> None:
        """Embed ``image_rgb`` (RGB uint8, HxWx3, or a PIL image); later ``predict`` calls
        reuse the embedding."""
        image_rgb = as_image(image_rgb)
        hw = check_image(image_rgb)
        self._hw = None  # sam2 forgets the last image first: so does predict() if this fails
        with self._autocast():
            self.predictor.set_image(image_rgb)
        self._hw = hw

    def segment(
        self, image_rgb: np.ndarray, objects: Sequence[Prompt], multimask: bool = False
    ) -> list[SegmentResult]:
        """Embed the image and predict one ``SegmentResult`` per object, in the given order."""
        image_rgb = as_image(image_rgb)
        height, width = check_image(image_rgb)
        objects = list(objects)
        # Prompts first: a bad prompt should not cost an image embedding.
        check_prompts(objects, height, width)
        self.set_image(image_rgb)
        return self.predict(objects, multimask)

    @torch.inference_mode()
    def predict(self, objects: Sequence[Prompt], multimask: bool = False) -> list[SegmentResult]:
        """Predict masks for ``objects`` on the image last given to ``set_image``."""
        if self._hw is None:
            raise RuntimeError("call set_image() (or segment()) before predict()")
        objects = list(objects)
        check_prompts(objects, *self._hw)
        with self._autocast():
            if len(objects) > 1 and all(p.points is None for p in objects):
                return self._predict_boxes(objects, multimask)
            return [self._predict_one(p, multimask) for p in objects]

    def _predict_boxes(self, objects: list[Prompt], multimask: bool) -> list[SegmentResult]:
        # The tutorial's batched boxes: one prompt-encoder/decoder pass for N boxes.
        boxes = np.array([p.box for p in objects], dtype=np.float32)
        masks, scores, logits = self.predictor.predict(
            point_coords=None, point_labels=None, box=boxes, multimask_output=multimask
        )
        # (N, K, H, W), (N, K), (N, K, h, w) for N > 1.
        return [_result(p.obj_id, masks[i], scores[i], logits[i]) for i, p in enumerate(objects)]

    def _predict_one(self, p: Prompt, multimask: bool) -> SegmentResult:
        points = labels = None
        if p.points is not None:
            points = np.array(p.points, dtype=np.float32)
            labels = np.array(p.labels, dtype=np.int32)
        box = None if p.box is None else np.array(p.box, dtype=np.float32)
        masks, scores, logits = self.predictor.predict(
            point_coords=points, point_labels=labels, box=box, multimask_output=multimask
        )
        return _result(p.obj_id, masks, scores, logits)


def _result(obj_id: int, masks: np.ndarray, scores: np.ndarray, logits: np.ndarray) -> SegmentResult:
    # Best first, as the tutorial's np.argsort(scores)[::-1]; stable so ties keep model order.
    order = np.argsort(-scores, kind="stable")
    return SegmentResult(
        obj_id=int(obj_id),
        masks=masks[order] > 0.5,  # the predictor returns 0.0/1.0 floats
        scores=scores[order].astype(np.float32),
        logits=logits[order].astype(np.float32),
    )


# --------------------------------------------------------------------------- outputs


def render_overlay(
    image: np.ndarray,
    results: Sequence[SegmentResult],
    prompts: Sequence[Prompt] = (),
    *,
    alpha: float = 0.5,
    random_colors: bool = False,
    labels: bool = False,
) -> np.ndarray:
    """The tutorial's look: each object's best mask filled at ``alpha`` with a white
    smoothed border, prompt boxes outlined in green, fg/bg points as green/red stars."""
    height, width = check_image(image)
    for r in results:
        if r.mask.shape != (height, width):
            raise UserError(f"object {r.obj_id}: its mask is {r.mask.shape[1]}x{r.mask.shape[0]}, "
                            f"the image {width}x{height}: results of another image?")
    objects = [Annotation(r.obj_id, r.mask, r.bbox, r.score) for r in results]
    out = annotate(image, objects, alpha=alpha, borders=True, labels=labels,
                   random_colors=random_colors, border_width=2)
    draw_boxes(out, [p.box for p in prompts if p.box is not None])
    for p in prompts:
        if p.points is not None:
            draw_points(out, p.points, p.labels or (1,) * len(p.points))
    return out


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    results: Sequence[SegmentResult],
    prompts: Sequence[Prompt] = (),
    **kwargs,
) -> np.ndarray:
    """Write :func:`render_overlay` to ``path`` (format from the extension); return the overlay."""
    from PIL import Image

    out = render_overlay(image, results, prompts, **kwargs)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(out).save(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot write overlay {path}: {_reason(e)}") from None
    return out


def mask_paths(dir_or_prefix: str | Path, obj_ids: Sequence[int]) -> list[Path]:
    """Where :func:`save_masks_png` writes: ``DIR/object_<id>.png`` for a folder (an
    existing one, a path ending in a separator, or one without a suffix), else
    ``<prefix>_object_<id>.png`` (a ``.png`` suffix on the prefix is dropped)."""
    text = str(dir_or_prefix)
    p = Path(text)
    if p.is_dir() or text.endswith(("/", "\\")) or not p.suffix:
        return [p / f"object_{i}.png" for i in obj_ids]
    stem = p.with_suffix("") if p.suffix.lower() == ".png" else p
    return [stem.parent / f"{stem.name}_object_{i}.png" for i in obj_ids]


def save_masks_png(dir_or_prefix: str | Path, results: Sequence[SegmentResult]) -> list[Path]:
    """One grayscale PNG per object (its best mask): 255 inside, 0 outside."""
    from PIL import Image

    paths = mask_paths(dir_or_prefix, [r.obj_id for r in results])
    try:
        for path, r in zip(paths, results, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(r.mask.astype(np.uint8) * 255).save(path)
    except OSError as e:
        raise UserError(f"cannot write masks to {dir_or_prefix}: {_reason(e)}") from None
    return paths


def _mask_record(mask: np.ndarray, score: float) -> dict:
    bbox = mask_bbox(mask)
    return {
        "score": float(score),
        "bbox": None if bbox is None else list(bbox),
        "area": mask_area(mask),
        "rle": encode_mask(mask),
    }


def results_to_dict(results: Sequence[SegmentResult]) -> dict:
    """JSON-ready results: per object its best mask as COCO RLE (column-major,
    ``counts`` a string) with obj_id, score, bbox [x0, y0, x1, y1] (x1/y1 exclusive)
    and area; with multimask output, all candidates (best first) under ``candidates``."""
    height, width = results[0].masks.shape[1:] if results else (0, 0)
    objects = []
    for r in results:
        obj = {"obj_id": r.obj_id, **_mask_record(r.mask, r.score)}
        if len(r.masks) > 1:
            obj["candidates"] = [_mask_record(m, s) for m, s in zip(r.masks, r.scores, strict=True)]
        objects.append(obj)
    return {"width": int(width), "height": int(height), "objects": objects}


def save_rle_json(path: str | Path, results: Sequence[SegmentResult]) -> dict:
    """Write :func:`results_to_dict` as JSON to ``path``; return the dict."""
    data = results_to_dict(results)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, allow_nan=False) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {_reason(e)}") from None
    return data


def _reason(e: Exception) -> str:
    # One line for the CLI: OSError's strerror, else the first line of the message.
    text = getattr(e, "strerror", None) or str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def prompts_from_args(
    boxes: Sequence[str] | None, points: Sequence[str] | None, prompts_file: str | Path | None = None
) -> list[Prompt]:
    """The objects of ``streamtrack segment``.

    Each ``--box`` is an object (ids 1, 2, ...) and all ``--point``s are one more,
    as for ``run``, except that exactly one ``--box`` with points is one object
    prompted by both (the tutorial's combined prompt).  Every entry of a prompts
    file is an object after those (its ``frame`` only orders them); ids must not clash.
    """
    from streamtrack import prompts as prompt_io

    objects: list[Prompt] = []
    if boxes and len(boxes) == 1 and points:
        parsed = [prompt_io.parse_point(t) for t in points]
        objects.append(Prompt.make(1, box=prompt_io.parse_box(boxes[0]),
                                   points=[p[:2] for p in parsed], labels=[p[2] for p in parsed]))
    else:
        objects.extend(prompt_io.from_cli(list(boxes or []), list(points or [])).get(0, []))
    if prompts_file is not None:
        by_frame = prompt_io.load_prompts_file(prompts_file)
        for frame in sorted(by_frame):
            for p in by_frame[frame]:
                if any(q.obj_id == p.obj_id for q in objects):
                    raise PromptError(
                        f"object {p.obj_id} is prompted twice (frames are ignored for one image;"
                        " --box/--point objects are numbered 1, 2, ...)"
                    )
                objects.append(p)
    if not objects:
        raise PromptError(
            "no prompt given: pass --box x0,y0,x1,y1, --point x,y[,label] or --prompts FILE.json"
        )
    return objects


def format_scores(result: SegmentResult) -> str:
    """One line per object for the CLI: its score, or all candidate scores best first."""
    if len(result.scores) == 1:
        return f"object {result.obj_id}: score {result.score:.4f} area {result.area}"
    scores = " ".join(f"{s:.4f}" for s in result.scores)
    return f"object {result.obj_id}: scores {scores} (best first) area {result.area}"


def load_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (as the tutorial: PIL, ``convert("RGB")``), turned
    upright as its EXIF orientation says (a phone photo is stored sideways): prompts
    and masks are in the image as viewers show it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = existing_file(path, "image")
    try:
        with Image.open(path) as im:
            return np.array(ImageOps.exif_transpose(im).convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable image ({_reason(e)})") from None
