"""Single-image SAM 2 segmentation: the flow of the official SAM 2 image tutorial.

``Segmenter`` wraps the official ``SAM2ImagePredictor`` around a model built by
:func:`streamtrack.models.build_model` (``kind="image"``), so it uses the same
registry and checkpoint loader as the tracker.  One image is embedded once
(``set_image``); each object is one prompt (a box, points with labels, or a box
with points); several box-only objects go through the predictor as one batched
``predict(box=Nx4)`` call, as in the tutorial's batched boxes.

Output helpers write the tutorial-style overlay, one 0/255 PNG per object and a
COCO-RLE JSON file, all or none: a failed write leaves the files already there as
they were.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import math
import os
import re
import secrets
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamtrack.engine import Prompt, check_prompt, prompt_list, without_negative_strides
from streamtrack.errors import (
    PromptError,
    UserError,
    error_reason,
    existing_file,
    file_name,
    looking_into,
    own_descriptor,
)
from streamtrack.models import DEFAULT_MODEL, build_model, resolve_device
from streamtrack.outputs import missing_folders
from streamtrack.overlay import Annotation, annotate, draw_boxes, draw_points
from streamtrack.protocol import encode_mask, mask_area, mask_bbox

log = logging.getLogger(__name__)


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
        if image.mode in HIGH_DEPTH_MODES:  # convert("RGB") would clip 16-bit values: as load_image
            return np.repeat(to_8bit(np.asarray(image))[..., None], 3, axis=2)
        return np.array(image.convert("RGB"))  # writable: torch warns on read-only arrays
    if isinstance(image, np.ndarray) and not image.flags.writeable:  # np.asarray(pil_image)
        return image.copy()
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
        self, image_rgb: np.ndarray, objects: Sequence[Prompt] | Prompt, multimask: bool = False
    ) -> list[SegmentResult]:
        """Embed the image and predict one ``SegmentResult`` per object, in the given order
        (one ``Prompt`` alone is taken as a list of one)."""
        image_rgb = as_image(image_rgb)
        height, width = check_image(image_rgb)
        objects = prompt_list(objects)
        # Prompts first: a bad prompt should not cost an image embedding.
        check_prompts(objects, height, width)
        self.set_image(image_rgb)
        return self.predict(objects, multimask)

    @torch.inference_mode()
    def predict(self, objects: Sequence[Prompt] | Prompt, multimask: bool = False) -> list[SegmentResult]:
        """Predict masks for ``objects`` on the image last given to ``set_image``."""
        if self._hw is None:
            raise RuntimeError("call set_image() (or segment()) before predict()")
        objects = prompt_list(objects)
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
    image = as_image(image)  # the PIL image given to segment() works here too
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


# Not a square, and wider than an icon: ICO keeps at most 256 pixels a side, ICNS scales to 1024².
_SIZE_PROBE = (300, 20)


def _size_kept(probe: io.BytesIO) -> str:
    """Why a format's file of ``_SIZE_PROBE`` does not hold the image at its size, or ""
    (also when PIL cannot read the format back, as PDF)."""
    from PIL import Image

    probe.seek(0)
    try:
        with Image.open(probe) as im:
            size = im.size
    except (OSError, ValueError):
        return ""
    return "" if size == _SIZE_PROBE else "it does not keep the image's size"


def image_format(path: str | Path, what: str = "overlay") -> str:
    """The PIL format an RGB image written to ``path`` gets from its extension, or
    ``UserError`` naming it as ``what`` (a missing or unknown extension, or a format
    PIL cannot write in RGB)."""
    from PIL import Image

    Image.init()
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix) if suffix else None
    if fmt is None:
        problem = f"unknown image extension {suffix!r}" if suffix else "no extension"
        raise UserError(f"{what} {path} has {problem}: give one such as .png or .jpg")
    problem = "" if fmt in Image.SAVE else "PIL reads them only"
    if not problem:
        probe = io.BytesIO()
        try:
            # Some writers exist only as stubs (HDF5, WMF) or take only 1-bit or palette images.
            Image.new("RGB", _SIZE_PROBE).save(probe, format=fmt)
        except (OSError, ValueError) as e:
            problem = error_reason(e)
        else:
            problem = _size_kept(probe)
    if problem:
        raise UserError(f"{what} {path}: cannot write an RGB {fmt} image ({problem}); "
                        "give another extension such as .png or .jpg")
    return fmt


def _encode_image(array: np.ndarray, fmt: str, what: str, path: Path) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    try:
        Image.fromarray(array).save(buffer, format=fmt)
    except (OSError, ValueError) as e:  # e.g. larger than the format allows (WebP: 16383 px)
        raise UserError(f"cannot write {what} {path}: {error_reason(e)}") from None
    return buffer.getvalue()


def overlay_file(path: str | Path, image: np.ndarray, results: Sequence[SegmentResult],
                 prompts: Sequence[Prompt] = (), **kwargs) -> tuple[Path, bytes, np.ndarray]:
    """(path, encoded bytes, overlay) of :func:`render_overlay` for ``path``'s format."""
    path = Path(path)
    fmt = image_format(path)
    out = render_overlay(image, results, prompts, **kwargs)
    return path, _encode_image(out, fmt, "overlay", path), out


def mask_files(dir_or_prefix: str | Path, results: Sequence[SegmentResult]) -> list[tuple[Path, bytes]]:
    """(path, PNG bytes) per object as :func:`save_masks_png` writes them."""
    paths = mask_paths(dir_or_prefix, [r.obj_id for r in results])
    return [(path, _encode_image(r.mask.astype(np.uint8) * 255, "PNG", "mask", path))
            for path, r in zip(paths, results, strict=True)]


def rle_file(path: str | Path, results: Sequence[SegmentResult]) -> tuple[Path, bytes, dict]:
    """(path, JSON bytes, dict) of :func:`results_to_dict`."""
    data = results_to_dict(results)
    return Path(path), (json.dumps(data, allow_nan=False) + "\n").encode(), data


def write_files(files: Sequence[tuple[str, Path, bytes]]) -> None:
    """Write ``(what, path, data)`` files all or none: each goes to a temporary name in
    its own folder, and only once all are written are they renamed over their paths.

    A failure leaves the files that were there as they were, removes the temporary
    files and any folder made for them, and raises ``UserError`` naming the file.
    A path that is not a regular file (``/dev/stdout``, a named pipe, a device) cannot
    be renamed over: it is written as it is, once the others are in place.
    """
    pending: list[tuple[str, Path, Path, Path]] = []  # what, path as given, temporary, target
    streams = [(what, path, data) for what, path, data in files if _is_stream(path)]
    made: list[Path] = []
    done = False
    try:
        targets: dict[Path, str] = {}
        for what, path, data in files:
            if _is_stream(path):
                continue
            # Through a symlink, as a plain write would: the link itself stays.
            target = Path(os.path.realpath(path))
            if target in targets:
                raise UserError(f"cannot write {what} {path}: the {targets[target]} is written there")
            targets[target] = what
            try:
                if target.is_dir():
                    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
                _make_folders(target.parent, made)
                pending.append((what, path, _write_temporary(target, data), target))
            except OSError as e:
                raise UserError(f"cannot write {what} {path}: {error_reason(e)}") from None
        while pending:
            what, path, temporary, target = pending[0]
            try:
                os.replace(temporary, target)
            except OSError as e:
                raise UserError(f"cannot write {what} {path}: {error_reason(e)}") from None
            pending.pop(0)
        for what, path, data in streams:
            try:
                fd = own_descriptor(path)  # /dev/stdout: as the shell opened it (>> appends)
                with open(path, "wb") if fd is None else os.fdopen(os.dup(fd), "wb") as f:
                    f.write(data)
            except OSError as e:
                raise UserError(f"cannot write {what} {path}: {error_reason(e)}") from None
        done = True
    finally:
        for _, _, temporary, _ in pending:
            temporary.unlink(missing_ok=True)
        for folder in reversed(made) if not done else ():
            try:
                folder.rmdir()
            except OSError:  # it holds a file renamed into place before the failure
                pass


def _is_stream(path: Path) -> bool:
    """Something there that is neither a regular file nor a folder: a device, a pipe; or a
    descriptor of this process, such as /dev/stdout redirected to a file (renamed over, the
    file would lose what it held)."""
    if own_descriptor(path) is not None:
        return True
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _make_folders(folder: Path, made: list[Path]) -> None:
    # One at a time, to know which ones to remove again if a later write fails.
    for f in reversed(missing_folders(folder)):
        f.mkdir()
        made.append(f)


def _write_temporary(target: Path, data: bytes) -> Path:
    # Beside the target, so that os.replace is a rename within one file system; hidden,
    # and short enough for a 255-byte file name limit.
    temporary = target.with_name(f".{target.name[:200]}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def save_overlay(
    path: str | Path,
    image: np.ndarray,
    results: Sequence[SegmentResult],
    prompts: Sequence[Prompt] = (),
    **kwargs,
) -> np.ndarray:
    """Write :func:`render_overlay` to ``path`` (format from the extension); return the overlay.
    A failure leaves an existing file at ``path`` as it was."""
    path, data, out = overlay_file(path, image, results, prompts, **kwargs)
    write_files([("overlay", path, data)])
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
    """One grayscale PNG per object (its best mask): 255 inside, 0 outside; all of them
    or, on a failure, none."""
    files = mask_files(dir_or_prefix, results)
    write_files([("mask", path, data) for path, data in files])
    return [path for path, _ in files]


def _mask_record(mask: np.ndarray, score: float) -> dict:
    bbox = mask_bbox(mask)
    return {
        # JSON has no NaN or infinity: a checkpoint with NaN weights gives such scores.
        "score": float(score) if math.isfinite(score) else None,
        "bbox": None if bbox is None else list(bbox),
        "area": mask_area(mask),
        "rle": encode_mask(mask),
    }


def results_to_dict(results: Sequence[SegmentResult]) -> dict:
    """JSON-ready results: per object its best mask as COCO RLE (column-major,
    ``counts`` a string) with obj_id, score, bbox [x0, y0, x1, y1] (x1/y1 exclusive)
    and area; with multimask output, all candidates (best first) under ``candidates``.
    A score that is not finite (NaN or infinite, from a broken checkpoint) is ``None``
    (JSON ``null``)."""
    height, width = results[0].masks.shape[1:] if results else (0, 0)
    objects = []
    for r in results:
        obj = {"obj_id": r.obj_id, **_mask_record(r.mask, r.score)}
        if len(r.masks) > 1:
            obj["candidates"] = [_mask_record(m, s) for m, s in zip(r.masks, r.scores, strict=True)]
        objects.append(obj)
    return {"width": int(width), "height": int(height), "objects": objects}


def save_rle_json(path: str | Path, results: Sequence[SegmentResult]) -> dict:
    """Write :func:`results_to_dict` as JSON to ``path``; return the dict.  A failure
    leaves an existing file at ``path`` as it was."""
    path, data, out = rle_file(path, results)
    write_files([("RLE file", path, data)])
    return out


def save_outputs(
    out: str | Path | None,
    image: np.ndarray,
    results: Sequence[SegmentResult],
    prompts: Sequence[Prompt] = (),
    *,
    masks: str | Path | None = None,
    rle: str | Path | None = None,
    **kwargs,
) -> None:
    """The overlay (unless ``out`` is None), and the mask PNGs and RLE JSON when asked
    for, written together: all are encoded first, then written all or none
    (:func:`write_files`), so a run that fails replaces none of the files a previous run left."""
    files = []
    if out is not None:
        path, data, _ = overlay_file(out, image, results, prompts, **kwargs)
        files.append(("overlay", path, data))
    if masks is not None:
        files += [("mask", p, d) for p, d in mask_files(masks, results)]
    if rle is not None:
        path, data, _ = rle_file(rle, results)
        files.append(("RLE file", path, data))
    write_files(files)


def check_output_paths(
    out: str | Path | None,
    masks: str | Path | None = None,
    rle: str | Path | None = None,
    obj_ids: Sequence[int] = (),
) -> list[tuple[str, Path]]:
    """Refuse, in one line, outputs of ``streamtrack segment`` that cannot be written:
    an overlay extension PIL cannot write, a directory where a file goes (or a file
    where the ``--save-masks`` folder goes), a folder that cannot be made.  Returns
    (option, path) of each file the run writes (``masks`` is a folder here).

    Checked before the model is built: a mistyped path should cost neither a model
    run nor, half-way through the writes, a file the user had.
    """
    for what, given in (("--out", out), ("--save-masks", masks), ("--save-rle", rle)):
        if given is not None and not str(given).strip():  # an unset shell variable: not "."
            raise UserError(f"{what}: empty path")
    if out is None and masks is None and rle is None:
        raise UserError("nothing to write: give --out OUT.png (the overlay), --save-masks DIR "
                        "or --save-rle FILE.json")
    for what, given in (("--out", out), ("--save-rle", rle)):
        if given is not None:
            file_name(given, what)
    outputs = [] if out is None else [("--out", Path(out))]
    if masks is not None:
        folder = Path(masks)
        with looking_into(masks, "--save-masks"):
            if folder.exists() and not folder.is_dir():
                raise UserError(f"--save-masks {masks} is a file, not a folder "
                                "(it gets object_<id>.png files)")
            _check_folder("--save-masks", masks, folder)
        outputs += [("--save-masks file", p) for p in mask_paths(os.path.join(masks, ""), obj_ids)]
    if rle is not None:
        outputs.append(("--save-rle", Path(rle)))
    for what, path in outputs:
        with looking_into(path, what):
            if path.is_dir():
                raise UserError(f"{what} {path} is a directory, not a file")
            _check_folder(what, path, path.parent)
    if out is not None:
        image_format(out, "--out")
    return outputs


def warn_earlier_masks(folder: str | Path | None, obj_ids: Sequence[int]) -> None:
    """Warn when the ``--save-masks`` folder holds masks of objects this run does not
    write: left there, they would read as this image's."""
    if folder is None or not Path(folder).is_dir():
        return
    ours = {p.name for p in mask_paths(os.path.join(folder, ""), obj_ids)}
    earlier = sorted(p.name for p in Path(folder).glob("object_*.png") if p.name not in ours)
    if earlier:
        log.warning("--save-masks folder %s already holds %s from an earlier run: this run leaves "
                    "%s", folder, ", ".join(earlier[:5]) + (" …" if len(earlier) > 5 else ""),
                    "it" if len(earlier) == 1 else "them")


def _check_folder(what: str, path: str | Path, folder: Path) -> None:
    # The first part of the folder that exists decides whether the rest can be made.
    missing = missing_folders(folder)
    folder = missing[-1].parent if missing else folder
    if not folder.is_dir():
        raise UserError(f"{what} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot write in {folder} (permission denied)")


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
    and masks are in the image as viewers show it.

    Images of more than 8 bits per pixel, which ``convert("RGB")`` would clip to
    nearly all white or all black, are scaled to 0-255 first (:func:`to_8bit`).  An image
    over PIL's decompression-bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, 179 Mpx) is
    refused with ``UserError``; below it, PIL's warning is not printed: the user named
    the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if "://" in str(path):
        raise UserError(f"image {path}: segment reads a local image file, not a URL (download it first)")
    path = existing_file(path, "image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # The image is read all the same: a cut-short EXIF block, a palette's
            # transparency (dropped by the RGB conversion).
            warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                if im.mode in HIGH_DEPTH_MODES:
                    return np.repeat(to_8bit(np.asarray(im))[..., None], 3, axis=2)
                return np.array(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{_mpx(int(found.group(1)))} Mpx, " if found else ""
        raise UserError(f"image {path} is too large: {size}more than PIL's limit of "
                        f"{_mpx(2 * Image.MAX_IMAGE_PIXELS)} Mpx; downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable image ({error_reason(e)})") from None


# PIL modes of one channel with more than 8 bits: 16-bit unsigned, 32-bit signed, 32-bit float.
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(values: np.ndarray) -> np.ndarray:
    """One channel of more than 8 bits as uint8, for the model's 8-bit RGB input.

    * unsigned 16-bit: by the type's range (``>> 8``), so 0 and 65535 are black and white;
    * integers (PIL mode ``I``): kept if in 0-255, by the 16-bit range if in 0-65535 (a
      16-bit PNG may open as ``I``), else stretched from the image's min to its max;
    * floats (mode ``F``): times 255 if in [0, 1], else stretched from the image's min to
      its max; NaN is black, infinities are black or white.

    A constant image outside those ranges is black.
    """
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        return (values >> 8).astype(np.uint8)
    if values.dtype.kind in "iu":
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo >= 0 and hi <= 255:
            return values.astype(np.uint8)
        if lo >= 0 and hi <= 65535:
            return (values >> 8).astype(np.uint8)
        return _stretch(values.astype(np.float64), lo, hi)
    values = values.astype(np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    return _stretch(np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo), lo, hi)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (values - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _mpx(pixels: int) -> str:
    mpx = pixels / 1e6
    return f"{mpx:,.0f}" if mpx >= 10 else f"{mpx:.2g}"
