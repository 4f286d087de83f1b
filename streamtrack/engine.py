"""Streaming SAM 2: memory-bank propagation one frame at a time, bounded memory.

The official ``SAM2VideoPredictor`` needs the whole video up front and keeps
every frame's outputs.  This engine runs the same model methods
(``forward_image``, ``_track_step``, ``_encode_new_memory``,
``_encode_memory_in_output``) on frames as they arrive and keeps, per object,
only what SAM 2's memory attention reads on the next frame:

* every conditioning (prompted) frame's memory features and object pointer
  (optionally capped to the most recent ``max_cond_frames``, the streaming case
  of ``select_closest_cond_frames``);
* memory features of the last ``num_maskmem - 1`` tracked frames;
* object pointers of the last ``max_obj_ptrs_in_encoder - 1`` tracked frames.

The retained entries are handed to the official ``_prepare_memory_conditioned_features``
as an ``output_dict`` keyed by absolute frame index, so temporal positions are
computed by sam2's own code.  Objects whose retained frames line up run as one
batch.  Prompts apply to the frame they are given with, before it is tracked:
as in the official predictor for a frame not yet tracked, the prompt is decoded
without memory and the frame becomes a conditioning frame for that object.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from streamtrack.compiled import compile_model, is_compiled, slot_count, tracked_frame, uses_cudagraphs
from streamtrack.errors import PromptError, UserError
from streamtrack.models import build_model, resolve_device
from streamtrack.protocol import mask_area, mask_bbox
from streamtrack.tracking import (  # noqa: F401 - re-exported: the engine's own types
    EngineConfig,
    FrameOutput,
    ObjectOutput,
    ObjectState,
    Prompt,
    _finite,
    check_mask_shape,
    check_prompt,
)

if TYPE_CHECKING:
    from streamtrack.multistream import SharedImageEncoder

log = logging.getLogger(__name__)

# Large enough that sam2 uses its full pointer window (min(num_frames, 16)) and
# never stops at "the end of the video": a live stream has none.
_ENDLESS = 2**31 - 1
_IMG_MEAN = (0.485, 0.456, 0.406)
_IMG_STD = (0.229, 0.224, 0.225)


@dataclass
class _StepJob:
    """A frame validated and numbered, waiting for its image-encoder output."""

    frame_idx: int
    height: int
    width: int
    prompts: list[Prompt]
    inputs: list[tuple]  # sam2 point/mask inputs, one per prompt
    now: float
    infer_start: float
    return_logits: bool


@dataclass(eq=False)
class PendingStep:
    """A step whose device work is queued (:meth:`StreamingEngine.launch`): its masks
    and scores are on their way to host memory, and :meth:`StreamingEngine.finish`
    waits for them and builds the :class:`FrameOutput`."""

    job: _StepJob
    ids: list[int] = field(default_factory=list)
    masks: torch.Tensor | None = None  # (N, H, W) bool, host (page-locked on CUDA)
    scalars: torch.Tensor | None = None  # (N, 2) object score logit, IoU
    logits: torch.Tensor | None = None  # (N, S/4, S/4) with return_logits
    copied: torch.cuda.Event | None = None  # the device->host copies are done (CUDA)
    output: FrameOutput | None = None  # a frame with nothing to track: already final


@dataclass
class _Memory:
    """What one tracked frame leaves behind for one object."""

    maskmem_features: torch.Tensor | None  # (1, C, h, w) bfloat16, as the official predictor
    obj_ptr: torch.Tensor  # (1, 256)

    def nbytes(self) -> int:
        n = self.obj_ptr.numel() * self.obj_ptr.element_size()
        if self.maskmem_features is not None:
            n += self.maskmem_features.numel() * self.maskmem_features.element_size()
        return n


@dataclass
class _Track:
    obj_id: int
    cond: dict[int, _Memory] = field(default_factory=dict)
    recent: dict[int, _Memory] = field(default_factory=dict)  # non-conditioning frames
    state: ObjectState = ObjectState.VISIBLE
    absent_since: float | None = None


class StreamingEngine:
    """SAM 2 video tracking on a stream of frames, one ``step`` per frame."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig | None = None, *,
                 encoder: SharedImageEncoder | None = None):
        """An engine on a built ``model``, at the model's own input size and on its device:
        ``config``'s ``model``, ``checkpoint``, ``device`` and ``image_size`` are for
        :meth:`from_config`.  ``encoder``: a :class:`~streamtrack.multistream.SharedImageEncoder`
        over the same model, to batch this engine's image-encoder pass with other streams'."""
        self.config = config or EngineConfig()
        self.encoder = encoder
        if not hasattr(model, "_get_image_feature"):
            raise UserError(
                f"the streaming engine runs SAM 2's video model, got a {type(model).__name__}: "
                "build it with build_model(name, checkpoint) (kind 'video', the default)")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.image_size: int = model.image_size
        preprocess = self.config.preprocess
        if preprocess == "auto":
            preprocess = "exact" if self.device.type == "cpu" else "fast"
        if preprocess not in ("exact", "fast"):
            raise UserError(f"preprocess must be exact, fast or auto, got {preprocess!r}")
        self.preprocess = preprocess
        cap = self.config.max_cond_frames  # checked by EngineConfig
        # sam2 reads the cap from the model, which other engines may share (a StreamGroup):
        # each engine sets its own before it tracks (_track).
        self._cond_cap = -1 if cap is None else cap
        model.max_cond_frames_in_attn = self._cond_cap
        # The windows sam2 reads on frame f: memories of f-1..f-(num_maskmem-1),
        # pointers of f-1..f-(max_obj_ptrs_in_encoder-1).
        self.mem_window = model.num_maskmem - 1
        self.ptr_window = model.max_obj_ptrs_in_encoder - 1 if model.use_obj_ptrs_in_encoder else 0
        self._mean = torch.tensor(_IMG_MEAN, dtype=torch.float32, device=self.device)[:, None, None]
        self._std = torch.tensor(_IMG_STD, dtype=torch.float32, device=self.device)[:, None, None]
        self._tracks: dict[int, _Track] = {}
        self._maskmem_pos_enc: list[torch.Tensor] | None = None  # shared by all frames
        self._staging: torch.Tensor | None = None  # pinned host buffer for frame uploads (CUDA)
        self._staged: torch.cuda.Event | None = None  # the last upload out of it is done
        self._pending: deque[PendingStep] = deque()  # launched, not yet finished, oldest first
        self.frame_idx = -1
        self._frame_hw: tuple[int, int] | None = None
        if self.config.compile:
            if self.device.type != "cuda" and self.config.compile_backend == "inductor":
                # Inductor compiles for a CPU too, but for minutes (a 2-core VM: 6 minutes for
                # two frames with reduce-overhead) and with no CUDA graphs to gain.
                log.warning("compiling the model (compile/compile_mode) on %s: the warm-up can take "
                            "many minutes and the CUDA-graph modes do nothing there; compile is "
                            "meant for CUDA", self.device.type)
            compile_model(model, self.config.compile_backend, self.config.compile_mode)
        elif not is_compiled(model):  # compiled, it is folded into the encoder's graph instead
            cache_pos_embed(model.image_encoder.trunk)
        cache_dense_pe(model.sam_prompt_encoder)  # eager on prompted frames, either way
        # Compiled code has static batch sizes: tracked objects run in batches padded to
        # slot counts, so an object joining never meets an uncompiled shape.
        self.pad_batches = is_compiled(model)
        if encoder is not None and uses_cudagraphs(model):
            raise UserError(
                f"compile mode {model.streamtrack_compile_mode} replays CUDA graphs, which are recorded "
                "per thread, and streams sharing a model (a stream group, a fleet actor) step on "
                "whichever thread leads a batch: use compile mode default for them")

    @classmethod
    def from_config(cls, config: EngineConfig) -> StreamingEngine:
        """Build the model ``config`` names (``model``, ``checkpoint``, ``device``,
        ``image_size``) and an engine on it; the constructor takes a built model and
        reads only the tracking settings.  Raises ``UserError`` (``CheckpointError`` for
        a checkpoint that is missing or does not match the model)."""
        device = resolve_device(config.device)
        model = build_model(
            config.model, config.checkpoint, device=device, image_size=config.image_size
        )
        return cls(model, config)

    # ------------------------------------------------------------------ objects
    @property
    def object_ids(self) -> list[int]:
        return list(self._tracks)

    def check_room(self, obj_ids: set[int]) -> None:
        """Raise ``PromptError`` if tracking ``obj_ids`` besides the current objects would
        exceed ``max_objects``."""
        new = obj_ids - self._tracks.keys()
        if new and len(self._tracks) + len(new) > self.config.max_objects:
            asked = f", {len(new)} new ones asked for" if len(new) > 1 else ""
            way = "remove one first (or raise max_objects)" if self._tracks else "raise max_objects"
            raise PromptError(
                f"object {min(new)}: {len(self._tracks)} objects are tracked{asked} and max_objects "
                f"is {self.config.max_objects}; {way}")

    def remove_object(self, obj_id: int) -> None:
        """Stop tracking ``obj_id`` (``PromptError`` if it is not tracked)."""
        if obj_id not in self._tracks:
            raise PromptError(f"unknown object id {obj_id!r}; known: {self.object_ids}")
        del self._tracks[obj_id]

    def reset(self) -> None:
        """Forget every object (frame numbering keeps counting)."""
        self._tracks.clear()

    def state_bytes(self) -> int:
        """Bytes of tensors the engine keeps between frames."""
        n = sum(m.nbytes() for t in self._tracks.values() for m in (*t.cond.values(), *t.recent.values()))
        if self._maskmem_pos_enc is not None:
            n += sum(x.numel() * x.element_size() for x in self._maskmem_pos_enc)
        return n

    def retained_frames(self, obj_id: int) -> dict[str, list[int]]:
        """Which frames an object's memory bank holds (for inspection and tests)."""
        t = self._tracks[obj_id]
        return {
            "cond": sorted(t.cond),
            "memory": sorted(k for k, m in t.recent.items() if m.maskmem_features is not None),
            "pointer": sorted(t.recent),
        }

    def warmup_once(self) -> float | None:
        """:meth:`warmup`, unless this engine's model was warmed already (engines sharing a
        model need it once) or there is nothing to gain (eager, on a CPU).  Returns the
        seconds spent, or None when it did not run."""
        if getattr(self.model, "streamtrack_warmed", False) or not (
            self.device.type == "cuda" or self.pad_batches
        ):
            return None
        seconds = self.warmup()
        self.model.streamtrack_warmed = True
        return seconds

    @torch.inference_mode()
    def warmup(self, steps: int | None = None) -> float:
        """Run throwaway prompts and tracked frames through the model, so kernel selection,
        allocator growth and (with ``compile``) compilation happen now rather than on the
        first live frame.  Compiled, every object batch size up to ``compile_slots`` is
        run, over enough frames to fill the memory window.  This engine's state is
        untouched.  Returns the seconds spent."""
        t0 = time.perf_counter()
        s = self.image_size
        blank = np.zeros((s, s, 3), np.uint8)
        box = [s / 4, s / 4, 3 * s / 4, 3 * s / 4]
        if steps is None:
            steps = 2
            if self.pad_batches:  # until the memory window is full: the last new shape
                steps = self.mem_window + 2
            if uses_cudagraphs(self.model):  # a graph per shape: until the pointer window is full
                steps = max(self.mem_window, self.ptr_window) + 2
        batch_sizes = [1]
        if self.pad_batches:
            batch_sizes = sorted({slot_count(n) for n in range(1, max(self.config.compile_slots, 1) + 1)})
        for n in batch_sizes:
            room = replace(self.config, max_objects=max(self.config.max_objects, n))
            scratch = StreamingEngine(self.model, room, encoder=None)
            prompts = [Prompt.make(i + 1, box=box) for i in range(n)]
            for i in range(max(steps, 1)):
                scratch.step(blank, prompts if i == 0 else [])
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # --------------------------------------------------------------------- step
    def step(
        self,
        frame: np.ndarray | torch.Tensor,
        prompts: list[Prompt] | tuple[Prompt, ...] | Prompt | None = (),
        *,
        timestamp: float | None = None,
        return_logits: bool = False,
    ) -> FrameOutput:
        """Track every object on ``frame`` (RGB uint8, HxWx3), applying ``prompts`` first.

        All input is validated before anything changes: a bad prompt raises
        ``PromptError``, a bad frame or timestamp ``UserError`` (``PromptError`` is a
        ``ValueError`` too; both are ``streamtrack.errors.UserError``), and the engine is
        as it was.  ``step`` while steps from :meth:`launch` are unfinished raises
        ``RuntimeError``: finish them first (or :meth:`drop_launched`).
        """
        if self._pending:
            raise RuntimeError(
                f"step() with {len(self._pending)} launched step(s) unfinished: finish() them "
                "first, or drop_launched()")
        return self.finish(self.launch(frame, prompts, timestamp=timestamp, return_logits=return_logits))

    @torch.inference_mode()
    def launch(
        self,
        frame: np.ndarray | torch.Tensor,
        prompts: list[Prompt] | tuple[Prompt, ...] | Prompt | None = (),
        *,
        timestamp: float | None = None,
        return_logits: bool = False,
    ) -> PendingStep:
        """The first half of :meth:`step`: queue the frame's device work, without waiting
        for it.  The engine's state moves on at once, so the next frame can be launched
        before this one is finished; on a GPU that keeps the device busy while the host
        turns the last frame's masks into results.  Finish steps in launch order.
        Raises as :meth:`step`, before anything changes."""
        height, width = _check_frame(frame)
        frame = without_negative_strides(frame)
        prompts = prompt_list(prompts)
        for p in prompts:
            check_prompt(p, height, width)
        inputs = [self._prompt_inputs(p, height, width) for p in _unique(prompts)]
        prompts = [p if type(p.obj_id) is int else replace(p, obj_id=int(p.obj_id)) for p in prompts]
        self.check_room({p.obj_id for p in prompts})
        if timestamp is not None and not _finite(timestamp):
            raise UserError(f"timestamp must be a finite number of seconds, got {timestamp!r}")
        now = time.monotonic() if timestamp is None else float(timestamp)
        self._note_frame_size(height, width)
        infer_start = time.time()
        self.frame_idx += 1
        f = self.frame_idx
        job = _StepJob(f, height, width, prompts, inputs, now, infer_start, return_logits)
        if not self._tracks and not inputs:
            if self.encoder is not None:
                self.encoder.idle(self)
            pending = PendingStep(job, output=FrameOutput(f, width, height, (), infer_start, time.time()))
        elif self.encoder is not None:
            # The encoder batches this frame with other streams' and runs the whole step on
            # the thread leading the batch: the streams' GPU work stays on one thread.
            pending = self.encoder.run(self, partial(self._prepare, frame), partial(self._track, job))
        else:
            image = self._prepare(frame)
            with self.autocast():
                backbone_out = self.model.forward_image(image)
            pending = self._track(job, image, backbone_out)
        self._pending.append(pending)
        return pending

    def _note_frame_size(self, height: int, width: int) -> None:
        """Frames may change size (a camera back in another mode): every frame is
        stretched to the model's square input and masks come at each frame's own size.
        Memory of frames with another aspect ratio was made from a differently
        stretched picture, though, so say so once per change."""
        before, self._frame_hw = self._frame_hw, (height, width)
        if before is None or before == (height, width) or not self._tracks:
            return
        if abs(width / height - before[1] / before[0]) > 0.01 * before[1] / before[0]:
            log.warning(
                "frame size changed from %dx%d to %dx%d while tracking %d object(s): their memory "
                "is of frames with another aspect ratio; if the masks drift, reset() and prompt again",
                before[1], before[0], width, height, len(self._tracks))

    def finish(self, pending: PendingStep) -> FrameOutput:
        """The second half of :meth:`step`: wait for ``pending``'s masks and scores and
        build its output (object states move on here, frame by frame).  ``RuntimeError``
        unless ``pending`` is the oldest step launched and not yet finished."""
        if not self._pending or self._pending[0] is not pending:
            raise RuntimeError("finish() takes launched steps in the order they were launched")
        self._pending.popleft()
        if pending.output is not None:
            return pending.output
        if pending.copied is not None:
            pending.copied.synchronize()
        job = pending.job
        masks = pending.masks.numpy()
        scalars = pending.scalars.tolist()
        prompted = {p.obj_id for p in job.prompts}
        objects = []
        for k, obj_id in enumerate(pending.ids):
            logit, iou = scalars[k]
            objects.append(
                self._object_output(
                    obj_id, masks[k], logit, iou, job.now, obj_id in prompted,
                    pending.logits[k] if pending.logits is not None else None,
                )
            )
        return FrameOutput(job.frame_idx, job.width, job.height, tuple(objects), job.infer_start, time.time())

    def drop_launched(self) -> None:
        """Forget launched steps that will not be finished (their caller stopped): the
        next launch starts a fresh order.  Their frames stay tracked: the memory bank has
        them."""
        self._pending.clear()

    @torch.inference_mode()
    def _prepare(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self._preprocess(frame)

    @torch.inference_mode()
    def _track(self, job: _StepJob, image: torch.Tensor, backbone_out: dict) -> PendingStep:
        """Everything after the image encoder: prompts, memory attention, decoding, memory;
        then the masks and scores start their copy to the host."""
        f, prompts = job.frame_idx, job.prompts
        self.model.max_cond_frames_in_attn = self._cond_cap
        with self.autocast():
            session = {"cached_features": {f: (image, backbone_out)}}
            results: dict[int, tuple] = {}
            prompted = {p.obj_id for p in prompts}
            for prompt, (point_inputs, mask_inputs) in zip(prompts, job.inputs, strict=True):
                results[prompt.obj_id] = self._add_conditioning_frame(
                    session, f, prompt.obj_id, point_inputs, mask_inputs
                )
            for group in self._batches(exclude=prompted):
                results.update(self._track_batch(session, f, group))
            self._prune(f)

            ids = list(self._tracks)
            low_res = torch.cat([results[i][0] for i in ids]).float()
            if self.config.fill_hole_area > 0:
                low_res = fill_holes(low_res, self.config.fill_hole_area)
            video_res = F.interpolate(low_res, size=(job.height, job.width), mode="bilinear",
                                      align_corners=False)
            masks = video_res[:, 0] > 0
            # One device->host copy for all scalars: a float() per object would sync each time.
            scalars = torch.stack(
                [torch.stack([results[i][1].float(), results[i][2].float()]) for i in ids]
            )
            logits = low_res[:, 0] if job.return_logits else None
        return self._to_host(PendingStep(job, ids, masks, scalars, logits))

    def _to_host(self, pending: PendingStep) -> PendingStep:
        """Start the copies of ``pending``'s tensors to the host.  On CUDA they go into
        page-locked memory without blocking, and an event marks them done; they are
        queued before any later frame's work, so later work cannot overwrite them."""
        if self.device.type != "cuda":
            pending.masks, pending.scalars = pending.masks.cpu(), pending.scalars.cpu()
            pending.logits = pending.logits.cpu() if pending.logits is not None else None
            return pending

        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

        pending.masks, pending.scalars, pending.logits = (
            host(pending.masks), host(pending.scalars), host(pending.logits))
        pending.copied = torch.cuda.Event()
        pending.copied.record()
        return pending

    # ---------------------------------------------------------------- internals
    def autocast(self):
        """The autocast context this engine's model work runs in (bf16 on CUDA)."""
        enabled = self.device.type == "cuda" and self.config.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _preprocess(self, frame: np.ndarray | torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if self.preprocess == "exact":
            # Bit for bit what sam2.utils.misc does to a video frame: PIL resize
            # of the uint8 image (Pillow's default filter), /255 in float64,
            # then float32 mean/std.
            rgb = frame.cpu().numpy() if isinstance(frame, torch.Tensor) else frame
            resized = np.array(Image.fromarray(rgb).resize((s, s)))
            img = torch.from_numpy(resized / 255.0).permute(2, 0, 1).float().to(self.device)
        else:
            if isinstance(frame, np.ndarray) and not frame.flags.writeable:
                frame = frame.copy()  # torch warns of undefined behaviour on a read-only array
            t = frame if isinstance(frame, torch.Tensor) else torch.from_numpy(frame)
            t = self._upload(t).permute(2, 0, 1)[None].float()
            img = F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            img = img[0] / 255.0
        img -= self._mean
        img /= self._std
        return img.unsqueeze(0)

    def _upload(self, frame: torch.Tensor) -> torch.Tensor:
        """The uint8 frame on the engine's device.  On CUDA it goes through a reused
        page-locked buffer so the copy is a DMA that does not stall the host.  With steps
        launched ahead (:meth:`launch`) the last upload may still be reading the buffer:
        an event after each upload says when it may be refilled (at once, usually)."""
        if self.device.type != "cuda" or frame.device.type != "cpu":
            return frame.to(self.device)
        if self._staged is not None:
            self._staged.synchronize()
        if self._staging is None or self._staging.shape != frame.shape:
            self._staging = torch.empty(frame.shape, dtype=torch.uint8, pin_memory=True)
        self._staging.copy_(frame)
        on_device = self._staging.to(self.device, non_blocking=True)
        self._staged = torch.cuda.Event()
        self._staged.record()
        return on_device

    def _prompt_inputs(self, p: Prompt, height: int, width: int):
        """Turn a prompt (checked by ``check_prompt``) into sam2's point/mask inputs (model pixels)."""
        if p.mask is not None:
            m = torch.from_numpy(np.asarray(p.mask).astype(bool))[None, None].float().to(self.device)
            s = self.image_size
            if (height, width) != (s, s):
                # As the official add_new_mask: antialiased bilinear, then >= 0.5.
                m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
                m = (m >= 0.5).float()
            return None, m
        coords, labels = [], []
        if p.box is not None:
            coords += [tuple(p.box[:2]), tuple(p.box[2:])]
            labels += [2, 3]  # sam2's box-corner labels
        if p.points is not None:
            coords += [tuple(pt) for pt in p.points]
            labels += [int(v) for v in p.labels]
        # Same arithmetic as add_new_points_or_box: normalise by the frame, scale to the model.
        pts = torch.tensor(coords, dtype=torch.float32)[None]
        pts = pts / torch.tensor([width, height]) * self.image_size
        point_inputs = {
            "point_coords": pts.to(self.device),
            "point_labels": torch.tensor(labels, dtype=torch.int32)[None].to(self.device),
        }
        return point_inputs, None

    def _add_conditioning_frame(self, session, f, obj_id, point_inputs, mask_inputs):
        m = self.model
        _, _, feats, pos, sizes = m._get_image_feature(session, f, 1)
        _, sam_out, _, _ = m._track_step(
            frame_idx=f, is_init_cond_frame=True, current_vision_feats=feats,
            current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=point_inputs,
            mask_inputs=mask_inputs, output_dict={}, num_frames=_ENDLESS,
            track_in_reverse=False, prev_sam_mask_logits=None,
        )
        ious, low_res, obj_ptr, score_logits = sam_out[2], sam_out[3], sam_out[5], sam_out[6]
        if self.config.fill_hole_area > 0:
            low_res = fill_holes(low_res, self.config.fill_hole_area)
        # As the official preflight: memory from the (binarised) mask the user sees.
        high_res = F.interpolate(
            low_res.float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        feats_mem, pos_enc = m._encode_new_memory(
            current_vision_feats=feats, feat_sizes=sizes, pred_masks_high_res=high_res,
            object_score_logits=score_logits, is_mask_from_pts=True,
        )
        self._keep_pos_enc(pos_enc)
        track = self._tracks.setdefault(obj_id, _Track(obj_id))
        track.recent.pop(f, None)
        track.cond[f] = _Memory(feats_mem.to(torch.bfloat16), obj_ptr)
        return low_res, score_logits[0, 0], ious.max(dim=-1).values[0]

    def _batches(self, exclude: set[int]) -> list[list[_Track]]:
        """Group objects whose retained frames coincide: they can share one forward pass."""
        groups: dict[tuple, list[_Track]] = defaultdict(list)
        for t in self._tracks.values():
            if t.obj_id in exclude:
                continue
            key = (
                tuple(t.cond),  # in order: it is the order of the memories attended to
                tuple(sorted((k, m.maskmem_features is not None) for k, m in t.recent.items())),
            )
            groups[key].append(t)
        return list(groups.values())

    def _track_batch(self, session, f, tracks: list[_Track]) -> dict[int, tuple]:
        m = self.model
        b = len(tracks)
        # Padding repeats the last object; its extra outputs are dropped below.
        slots = slot_count(b) if self.pad_batches else b
        padded = tracks + [tracks[-1]] * (slots - b)
        _, _, feats, pos, sizes = m._get_image_feature(session, f, slots)
        output_dict = {
            "cond_frame_outputs": self._stack(padded, "cond", slots),
            "non_cond_frame_outputs": self._stack(padded, "recent", slots),
        }
        with tracked_frame() if self.pad_batches else contextlib.nullcontext():
            current_out, sam_out, _, _ = m._track_step(
                frame_idx=f, is_init_cond_frame=False, current_vision_feats=feats,
                current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None,
                mask_inputs=None, output_dict=output_dict, num_frames=_ENDLESS,
                track_in_reverse=False, prev_sam_mask_logits=None,
            )
            ious, low_res, high_res, obj_ptr, score_logits = (
                sam_out[2], sam_out[3], sam_out[4], sam_out[5], sam_out[6]
            )
            m._encode_memory_in_output(feats, sizes, None, True, high_res, score_logits, current_out)
        self._keep_pos_enc(current_out["maskmem_pos_enc"])
        maskmem = current_out["maskmem_features"].to(torch.bfloat16)
        if slots > b:  # keep only the real objects' memories (views would pin the padding)
            maskmem, obj_ptr = maskmem[:b].clone(), obj_ptr[:b].clone()
        best_iou = ious.max(dim=-1).values
        out = {}
        for k, t in enumerate(tracks):
            t.recent[f] = _Memory(maskmem[k : k + 1], obj_ptr[k : k + 1])
            out[t.obj_id] = (low_res[k : k + 1], score_logits[k, 0], best_iou[k])
        return out

    def _stack(self, tracks: list[_Track], which: str, b: int) -> dict[int, dict]:
        pos_enc = [x.expand(b, -1, -1, -1) for x in self._maskmem_pos_enc]
        stacked = {}
        for t in getattr(tracks[0], which):
            mems = [getattr(tr, which)[t] for tr in tracks]
            feats = None
            if mems[0].maskmem_features is not None:
                feats = _cat([x.maskmem_features for x in mems])
            # A frame outside the memory window may still lend its pointer; sam2
            # only reads "maskmem_features" for frames inside the window.
            stacked[t] = {
                "maskmem_features": feats,
                "maskmem_pos_enc": pos_enc,
                "obj_ptr": _cat([x.obj_ptr for x in mems]),
            }
        return stacked

    def _keep_pos_enc(self, pos_enc: list[torch.Tensor]) -> None:
        # The memory position encoding is the same for every frame and object
        # (the official predictor caches it as a constant too).
        if self._maskmem_pos_enc is None:
            self._maskmem_pos_enc = [x[0:1].clone() for x in pos_enc]

    def _prune(self, f: int) -> None:
        """Drop what frame f+1 will not read (see module docstring)."""
        next_f = f + 1
        cap = self.config.max_cond_frames
        for t in self._tracks.values():
            for k in [k for k in t.recent if k < next_f - self.ptr_window]:
                del t.recent[k]
            for k, mem in t.recent.items():
                if k < next_f - self.mem_window:
                    mem.maskmem_features = None
            if cap is not None and len(t.cond) > cap:
                keep = set(sorted(t.cond)[-cap:])
                dropped = [k for k in t.cond if k not in keep and k < next_f - self.ptr_window]
                for k in dropped:
                    del t.cond[k]
                if dropped:
                    # The official predictor, still holding them all, attends to the frames
                    # it selects closest first; sam2 takes a dict within the cap in its own
                    # order, so the rest are kept in that order (the same sums, bit for bit).
                    t.cond = dict(sorted(t.cond.items(), reverse=True))

    def _object_output(self, obj_id, mask, logit, iou, now, prompted, logits) -> ObjectOutput:
        # An object removed after its frame was launched still gets that frame's output.
        track = self._tracks.get(obj_id) or _Track(obj_id)
        if logit > 0:
            track.state, track.absent_since = ObjectState.VISIBLE, None
        else:
            if track.absent_since is None:
                track.absent_since = now
            lost = now - track.absent_since >= self.config.lost_after
            track.state = ObjectState.LOST if lost else ObjectState.OCCLUDED
        return ObjectOutput(
            obj_id=obj_id, mask=mask, score=1.0 / (1.0 + math.exp(-logit)), object_score_logit=logit,
            iou=iou, bbox=mask_bbox(mask), area=mask_area(mask), state=track.state, prompted=prompted,
            logits=logits,
        )


def cache_pos_embed(trunk: torch.nn.Module) -> None:
    """Compute the Hiera trunk's position embedding once per input size instead of per frame:
    sam2's ``Hiera._get_pos_embed`` resizes (bicubic) and tiles fixed weights on every
    forward pass; for a stream at one input size the result never changes."""
    if hasattr(trunk, "pos_embed"):
        _cache_constant(trunk, "_get_pos_embed", trunk.pos_embed, "streamtrack_pos_cache")


def cache_dense_pe(prompt_encoder: torch.nn.Module) -> None:
    """Compute the prompt encoder's dense position encoding once instead of per frame:
    sam2 calls ``get_dense_pe()`` for every mask decoding (~15 small operators from fixed
    random frequencies), though it depends only on the input size.  Eager decodings (an
    eager engine's, and prompted frames') use the kept result; a compiled one traces
    sam2's computation into its graph."""
    pe_layer = getattr(prompt_encoder, "pe_layer", None)
    if pe_layer is not None and hasattr(pe_layer, "positional_encoding_gaussian_matrix"):
        _cache_constant(prompt_encoder, "get_dense_pe", pe_layer.positional_encoding_gaussian_matrix,
                        "streamtrack_dense_pe_cache")


def _cache_constant(owner: torch.nn.Module, method: str, source: torch.Tensor, attr: str) -> None:
    """Replace ``owner.<method>`` by one that keeps sam2's result per arguments, so results
    are bit-identical, keyed by everything else that can change it: ``source``'s device and
    dtype (the weights it is computed from) and the autocast state.  Only under inference
    mode, where the engine runs; anything else gets sam2's method as is.  Computed eagerly
    outside any compiled region, the kept tensors never live in CUDA-graph memory.  The
    cache is ``owner.<attr>``; a second engine on the model finds it and wraps nothing."""
    if getattr(owner, attr, None) is not None:
        return
    compute = getattr(owner, method)
    cache: dict[tuple, torch.Tensor] = {}

    def cached(*args):
        # Traced into a compiled graph, sam2's computation becomes part of the graph.
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            return compute(*args)
        dev = source.device.type
        key = (tuple(tuple(int(v) for v in a) for a in args), source.device, source.dtype,
               torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        if key not in cache:
            cache[key] = compute(*args)
        return cache[key]

    setattr(owner, method, cached)
    setattr(owner, attr, cache)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def fill_holes(logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """Fill background holes of at most ``max_area`` pixels in mask logits.

    What the official ``fill_holes_in_mask_scores`` does with sam2's CUDA
    extension (8-connected components, holes set to 0.1), here with OpenCV so it
    runs on any device.  The official predictor silently skips it without that
    extension, so it is off by default.
    """
    out = logits.clone()
    bg = (logits <= 0).cpu().numpy().astype(np.uint8)
    for i in range(bg.shape[0]):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(bg[i, 0], connectivity=8)
        small = [j for j in range(1, n) if stats[j, cv2.CC_STAT_AREA] <= max_area]
        if small:
            hole = torch.from_numpy(np.isin(labels, small)).to(out.device)
            out[i, 0][hole] = 0.1
    return out


def _check_frame(frame) -> tuple[int, int]:
    if isinstance(frame, torch.Tensor):
        shape, dtype_ok = tuple(frame.shape), frame.dtype == torch.uint8
    elif isinstance(frame, np.ndarray):
        shape, dtype_ok = frame.shape, frame.dtype == np.uint8
    else:
        raise UserError(f"a frame must be a numpy array or torch tensor, got {type(frame).__name__}")
    if len(shape) != 3 or shape[2] != 3 or shape[0] < 1 or shape[1] < 1 or not dtype_ok:
        raise UserError(f"a frame must be RGB uint8 of shape (H, W, 3), got {shape} {frame.dtype}")
    return shape[0], shape[1]


def prompt_list(prompts) -> list[Prompt]:
    """``prompts`` as a list: None or one ``Prompt`` are accepted for convenience."""
    if prompts is None:
        return []
    if isinstance(prompts, Prompt):
        return [prompts]
    if isinstance(prompts, (dict, str, bytes)) or not hasattr(prompts, "__iter__"):
        raise PromptError(
            f"prompts must be a list of Prompt (Prompt.make(...)), got {type(prompts).__name__}")
    prompts = list(prompts)
    for p in prompts:
        if not isinstance(p, Prompt):
            raise PromptError(f"prompts must be Prompt objects (Prompt.make(...)), got {type(p).__name__}")
    return prompts


def without_negative_strides(frame):
    """torch cannot wrap numpy views with negative strides (``bgr[..., ::-1]``): copy those
    (anything else is returned as it is)."""
    if isinstance(frame, np.ndarray) and any(s < 0 for s in frame.strides):
        return np.ascontiguousarray(frame)
    return frame


def _unique(prompts: list[Prompt]) -> list[Prompt]:
    seen = set()
    for p in prompts:
        if p.obj_id in seen:
            raise PromptError(f"two prompts for object {p.obj_id} on one frame; merge them into one")
        seen.add(p.obj_id)
    return prompts

