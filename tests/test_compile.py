"""The compiled engine: padded object batches, no recompilation after warm-up, same results.

Dynamo's ``eager`` backend keeps the test fast on a CPU: tracing, guards and
recompilation are dynamo's and the same whatever backend runs the graphs, so a
shape that would recompile under inductor shows up here as a new graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from streamtrack.compiled import slot_count
from streamtrack.engine import EngineConfig, Prompt, StreamingEngine
from streamtrack.models import build_model
from streamtrack.synthetic import make_clip

IMAGE_SIZE = 128  # dynamo traces every graph once per batch size: keep it small


@pytest.mark.parametrize(("n", "slots"), [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (16, 16), (17, 32)])
def test_slot_count(n, slots):
    assert slot_count(n) == slots


def _prompts_for(clip, frame: int) -> list[Prompt]:
    """Object 1 boxed on frame 0; on frame 3 three objects join in one batch (a box,
    a box and a three-click prompt, whose shape no tracked frame has); on frame 6
    object 1 is refined with clicks."""
    if frame == 0:
        return [Prompt.make(1, box=clip.box(1, 0))]
    if frame == 3:
        x0, y0, x1, y1 = clip.box(3, 3)
        clicks = [[(x0 + x1) / 2, (y0 + y1) / 2], [x0 + 1, y0 + 1], [x1 - 1, y1 - 1]]
        return [Prompt.make(2, box=clip.box(2, 3)), Prompt.make(3, box=clip.box(1, 3)),
                Prompt.make(4, points=clicks, labels=[1, 0, 1])]
    if frame == 6:
        x0, y0, x1, y1 = clip.box(1, 6)
        return [Prompt.make(1, points=[[(x0 + x1) / 2, (y0 + y1) / 2]], labels=[1])]
    return []


def _run(engine: StreamingEngine, clip) -> list:
    return [engine.step(f, _prompts_for(clip, i), return_logits=True) for i, f in enumerate(clip.frames)]


def test_compiled_engine_pads_batches_and_never_recompiles_after_warmup(tiny_checkpoint):
    clip = make_clip(12, 160, 120, num_objects=3, seed=5)
    eager = StreamingEngine(build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=IMAGE_SIZE),
                            EngineConfig(preprocess="exact"))
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=IMAGE_SIZE)
    compiled = StreamingEngine(model, EngineConfig(preprocess="exact", compile=True, compile_backend="eager",
                                                   compile_slots=4))
    assert compiled.pad_batches and not eager.pad_batches

    decoder_batches: list[int] = []
    model.sam_mask_decoder.register_forward_pre_hook(
        lambda _m, _a, kw: decoder_batches.append(kw["image_embeddings"].shape[0]), with_kwargs=True
    )
    compiled.warmup()
    assert {1, 2, 4} <= set(decoder_batches)  # every slot count was compiled at warm-up
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    decoder_batches.clear()

    expected, got = _run(eager, clip), _run(compiled, clip)

    # Objects 2-4 (one batch of three) ran padded to four slots; nothing ran at three.
    assert 4 in decoder_batches and 3 not in decoder_batches
    # New objects, a batch size never used before and a three-click prompt: no new graph.
    assert counters["stats"]["unique_graphs"] == graphs_after_warmup
    for a, b in zip(expected, got, strict=True):
        assert [o.obj_id for o in a.objects] == [o.obj_id for o in b.objects]
        for oa, ob in zip(a.objects, b.objects, strict=True):
            assert np.array_equal(oa.mask, ob.mask), (a.frame_idx, oa.obj_id)
            assert torch.allclose(oa.logits, ob.logits, atol=1e-4), (a.frame_idx, oa.obj_id)
            assert oa.object_score_logit == pytest.approx(ob.object_score_logit, abs=1e-4)
    # Padding slots are not kept: the memory banks are the same size.
    assert compiled.state_bytes() == eager.state_bytes()
    for obj_id in eager.object_ids:
        assert compiled.retained_frames(obj_id) == eager.retained_frames(obj_id)
