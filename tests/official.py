"""Run the official ``SAM2VideoPredictor`` as the reference for the streaming engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streamtrack.engine import Prompt, StreamingEngine
from streamtrack.models import build_model


@dataclass
class Tracks:
    """Per frame, per object id: bool mask at frame size and low-res logits."""

    masks: dict[int, dict[int, np.ndarray]]
    logits: dict[int, dict[int, torch.Tensor]]


def run_official(checkpoint: Path, jpeg_dir: Path, num_frames: int,
                 prompts: dict[int, list[Prompt]], image_size: int, device: str = "cpu") -> Tracks:
    """Prompts on frame k are added, then the video is propagated forward from k.

    Propagating forward from each prompted frame (not from frame 0 with all
    prompts known in advance) is what a stream can do: a prompt on frame k
    cannot influence frames before k.
    """
    pred = build_model("sam2.1_hiera_tiny", checkpoint, image_size=image_size, device=device)
    state = pred.init_state(str(jpeg_dir))
    masks: dict[int, dict[int, np.ndarray]] = {}
    starts = sorted(prompts)
    for n, k in enumerate(starts):
        for p in prompts[k]:
            if p.mask is not None:
                pred.add_new_mask(state, k, p.obj_id, p.mask)
            else:
                pred.add_new_points_or_box(
                    state, k, p.obj_id,
                    points=None if p.points is None else np.array(p.points, np.float32),
                    labels=None if p.labels is None else np.array(p.labels, np.int32),
                    box=None if p.box is None else np.array(p.box, np.float32),
                )
        end = starts[n + 1] - 1 if n + 1 < len(starts) else num_frames - 1
        for f, obj_ids, video_res in pred.propagate_in_video(
            state, start_frame_idx=k, max_frame_num_to_track=end - k
        ):
            masks[f] = {oid: (video_res[i, 0] > 0).cpu().numpy() for i, oid in enumerate(obj_ids)}
    logits: dict[int, dict[int, torch.Tensor]] = {f: {} for f in masks}
    for oid, idx in state["obj_id_to_idx"].items():
        out = state["output_dict_per_obj"][idx]
        for f, o in {**out["non_cond_frame_outputs"], **out["cond_frame_outputs"]}.items():
            logits[f][oid] = o["pred_masks"][0, 0].cpu()
    return Tracks(masks, logits)


def run_engine(engine: StreamingEngine, frames, prompts: dict[int, list[Prompt]],
               on_frame=None) -> Tracks:
    masks, logits = {}, {}
    for f, frame in enumerate(frames):
        out = engine.step(frame, prompts.get(f, []), return_logits=True)
        masks[f] = {o.obj_id: o.mask for o in out.objects}
        logits[f] = {o.obj_id: o.logits for o in out.objects}
        if on_frame is not None:
            on_frame(f, out)
    return Tracks(masks, logits)


def compare(ref: Tracks, got: Tracks) -> tuple[float, float, tuple]:
    """Worst per-frame mask IoU, worst per-frame mean |logit difference|, and where."""
    worst_iou, worst_diff, where = 1.0, 0.0, None
    for f, objs in ref.masks.items():
        assert set(got.masks[f]) == set(objs), f"frame {f}: objects {set(got.masks[f])} != {set(objs)}"
        for oid, a in objs.items():
            b = got.masks[f][oid]
            union = (a | b).sum()
            iou = 1.0 if union == 0 else float((a & b).sum() / union)
            diff = float((ref.logits[f][oid] - got.logits[f][oid]).abs().mean())
            if iou < worst_iou or diff > worst_diff:
                where = (f, oid)
            worst_iou, worst_diff = min(worst_iou, iou), max(worst_diff, diff)
    return worst_iou, worst_diff, where
