"""Several streams on one model: the batched image encoder and the stream group."""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import pytest
import torch
from conftest import TEST_IMAGE_SIZE

from streamtrack.engine import EngineConfig, Prompt, StreamingEngine
from streamtrack.models import build_model
from streamtrack.multistream import SharedImageEncoder, StreamGroup
from streamtrack.pipeline import RunConfig, Tracker
from streamtrack.protocol import decode_mask
from streamtrack.synthetic import make_clip, write_video

FRAMES = 8


class _DoublingModel:
    """Stands in for SAM 2's forward_image: output = f(input), batch dim kept."""

    def __init__(self, fail: bool = False):
        self.batch_sizes: list[int] = []
        self.fail = fail

    def forward_image(self, x):
        self.batch_sizes.append(x.shape[0])
        if self.fail:
            raise RuntimeError("encoder exploded")
        return {"vision_features": x * 2, "backbone_fpn": [x + 1, x + 2], "vision_pos_enc": (x - 1,)}


def _submit_all(encoder, images, members):
    results, errors = [None] * len(images), [None] * len(images)

    def work(k):
        try:
            results[k] = encoder.encode(images[k], member=members[k])
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            errors[k] = exc

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "an encode call never returned"
    return results, errors


def test_encoder_batches_members_and_hands_each_its_slice():
    model = _DoublingModel()
    encoder = SharedImageEncoder(model, max_wait=30.0)  # only a full batch may run
    members = ["a", "b", "c"]
    encoder._active.update(members)  # all three expected: the batch waits for all
    images = [torch.full((1, 3, 4, 4), float(k)) for k in range(3)]
    results, errors = _submit_all(encoder, images, members)
    assert errors == [None] * 3
    assert model.batch_sizes == [3]
    for k, out in enumerate(results):
        assert out["vision_features"].shape == (1, 3, 4, 4)
        assert torch.equal(out["vision_features"], images[k] * 2)
        assert torch.equal(out["backbone_fpn"][1], images[k] + 2)
        assert isinstance(out["vision_pos_enc"], tuple)
        assert torch.equal(out["vision_pos_enc"][0], images[k] - 1)
    assert (encoder.batches, encoder.frames) == (1, 3)


def test_idle_member_does_not_hold_the_batch():
    model = _DoublingModel()
    encoder = SharedImageEncoder(model, max_wait=60.0)
    encoder._active.update(["a", "b"])
    encoder.idle("b")  # b has no objects: a must not wait a minute for it
    results, errors = _submit_all(encoder, [torch.ones(1, 3, 2, 2)], ["a"])
    assert errors == [None] and model.batch_sizes == [1]


def test_wait_expires_for_a_member_that_never_submits():
    model = _DoublingModel()
    encoder = SharedImageEncoder(model, max_wait=0.05)
    encoder._active.update(["a", "slow"])
    results, errors = _submit_all(encoder, [torch.ones(1, 3, 2, 2)], ["a"])
    assert errors == [None] and model.batch_sizes == [1]


def test_encoder_failure_reaches_every_member_of_the_batch():
    encoder = SharedImageEncoder(_DoublingModel(fail=True), max_wait=30.0)
    encoder._active.update(["a", "b"])
    _, errors = _submit_all(encoder, [torch.ones(1, 3, 2, 2)] * 2, ["a", "b"])
    assert all(isinstance(e, RuntimeError) and "exploded" in str(e) for e in errors)


def _clips():
    return [make_clip(FRAMES, 160, 120, num_objects=2, seed=s) for s in (5, 6)]


def _prompts(clip):
    return [Prompt.make(1, box=clip.box(1, 0)), Prompt.make(2, points=[clip.center(2, 0)])]


def _run(engine, clip, out):
    for i, frame in enumerate(clip.frames):
        out.append(engine.step(frame, _prompts(clip) if i == 0 else [], return_logits=True))


def test_shared_encoder_engines_equal_independent_engines(tiny_checkpoint):
    """Two streams, each with its own memory bank, batched through one encoder on two
    threads, give the same masks and logits as two engines run on their own."""
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=TEST_IMAGE_SIZE)
    clips = _clips()
    alone = []
    for clip in clips:
        out: list = []
        _run(StreamingEngine(model, EngineConfig()), clip, out)
        alone.append(out)

    encoder = SharedImageEncoder(model, max_wait=30.0)
    engines = [StreamingEngine(model, EngineConfig(), encoder=encoder) for _ in clips]
    encoder._active.update(engines)  # both streams expected from the first frame
    shared: list[list] = [[], []]
    threads = [threading.Thread(target=_run, args=(engines[k], clips[k], shared[k])) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert [len(s) for s in shared] == [FRAMES, FRAMES]
    assert (encoder.batches, encoder.frames) == (FRAMES, 2 * FRAMES)  # every frame batched in pairs

    for k in range(2):
        for a, b in zip(alone[k], shared[k], strict=True):
            for oa, ob in zip(a.objects, b.objects, strict=True):
                assert oa.obj_id == ob.obj_id
                union = (oa.mask | ob.mask).sum()
                iou = 1.0 if union == 0 else (oa.mask & ob.mask).sum() / union
                assert iou >= 0.998, (k, a.frame_idx, oa.obj_id, iou)
                assert float((oa.logits - ob.logits).abs().mean()) <= 1e-3
    # The streams really are different (a mix-up of slices would not pass the above).
    assert not np.array_equal(alone[0][-1].objects[0].mask, alone[1][-1].objects[0].mask)


def _run_scheduled(engine, frames, prompts_at, out, encoder=None):
    for i, frame in enumerate(frames):
        out.append(engine.step(frame, prompts_at.get(i, []), return_logits=True))
    if encoder is not None:
        encoder.idle(engine)  # done: batches stop waiting for it


def test_shared_encoder_keeps_streams_apart_across_sizes_late_objects_and_ends(tiny_checkpoint):
    """Streams of different frame sizes, one whose first object comes on frame 2 and a
    second later, one that ends early: each gives what it gives alone."""
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=TEST_IMAGE_SIZE)
    wide = make_clip(FRAMES, 160, 120, num_objects=2, seed=5)
    tall = make_clip(FRAMES, 96, 128, num_objects=2, seed=6)
    short = make_clip(FRAMES - 3, 128, 96, num_objects=2, seed=7)
    streams = [
        (wide.frames, {0: _prompts(wide)}),
        (tall.frames, {2: [Prompt.make(1, box=tall.box(1, 2))], 4: [Prompt.make(5, box=tall.box(2, 4))]}),
        (short.frames, {0: [Prompt.make(3, points=[short.center(1, 0)])]}),
    ]
    alone = []
    for frames, prompts_at in streams:
        out: list = []
        _run_scheduled(StreamingEngine(model, EngineConfig()), frames, prompts_at, out)
        alone.append(out)

    encoder = SharedImageEncoder(model, max_wait=30.0, max_batch=2)
    engines = [StreamingEngine(model, EngineConfig(), encoder=encoder) for _ in streams]
    shared: list[list] = [[] for _ in streams]
    threads = [threading.Thread(target=_run_scheduled, args=(engines[k], *streams[k], shared[k], encoder))
               for k in range(len(streams))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert [len(s) for s in shared] == [len(a) for a in alone] == [FRAMES, FRAMES, FRAMES - 3]
    assert encoder.batches < encoder.frames  # some frames really were batched together
    for k in range(len(streams)):
        for a, b in zip(alone[k], shared[k], strict=True):
            assert (a.width, a.height) == (b.width, b.height)
            assert [o.obj_id for o in a.objects] == [o.obj_id for o in b.objects]
            for oa, ob in zip(a.objects, b.objects, strict=True):
                union = (oa.mask | ob.mask).sum()
                iou = 1.0 if union == 0 else (oa.mask & ob.mask).sum() / union
                assert iou >= 0.998, (k, a.frame_idx, oa.obj_id, iou)


def test_stream_group_runs_streams_on_one_model(tiny_checkpoint, tmp_path, monkeypatch):
    clips = _clips()
    configs = []
    for k, clip in enumerate(clips):
        video = tmp_path / f"cam{k}.mp4"
        write_video(clip.frames, video, fps=10)
        configs.append(RunConfig(
            source=str(video), stream=f"cam{k}", prompts={0: _prompts(clip)}, progress=False,
            engine=EngineConfig(checkpoint=str(tiny_checkpoint), image_size=TEST_IMAGE_SIZE),
            save_jsonl=str(tmp_path / f"cam{k}.jsonl"), max_frames=8,
        ))
    configs.append(RunConfig(source=str(tmp_path / "missing.mp4"), stream="broken", progress=False,
                             engine=configs[0].engine))
    group = StreamGroup(configs, max_wait=5.0)  # generous: batching must not depend on timing
    # As with compile on: padded object batches, and one warm-up for the group up front.
    warmups = []
    monkeypatch.setattr(StreamingEngine, "warmup", lambda self: warmups.append(self) or 0.0)
    for tracker in group.trackers.values():
        tracker.engine.pad_batches = True
    summaries = group.run()
    assert len(warmups) == 1 and group.model.streamtrack_warmed
    assert set(summaries) == {"cam0", "cam1"}
    assert "broken" in group.errors and "missing.mp4" in str(group.errors["broken"])
    assert group.encoder.frames == 16 and group.encoder.batches < 16
    for k in range(2):
        lines = [json.loads(x) for x in (tmp_path / f"cam{k}.jsonl").read_text().splitlines()]
        assert [x["frame_id"] for x in lines] == list(range(8))
        assert {x["stream"] for x in lines} == {f"cam{k}"}
    # cam0 run on its own gives the same masks.
    alone = dataclasses.replace(configs[0], save_jsonl=str(tmp_path / "alone.jsonl"))
    Tracker(alone).run()
    for a, b in zip((tmp_path / "alone.jsonl").read_text().splitlines(),
                    (tmp_path / "cam0.jsonl").read_text().splitlines(), strict=True):
        for oa, ob in zip(json.loads(a)["objects"], json.loads(b)["objects"], strict=True):
            ma, mb = decode_mask(oa["rle"]), decode_mask(ob["rle"])
            assert (ma & mb).sum() >= 0.998 * max((ma | mb).sum(), 1)


def test_stream_group_refuses_mixed_models(tiny_checkpoint):
    a = RunConfig(source="a.mp4", stream="a", engine=EngineConfig(checkpoint=str(tiny_checkpoint)))
    b = RunConfig(source="b.mp4", stream="b", engine=EngineConfig(checkpoint=str(tiny_checkpoint),
                                                                  image_size=512))
    with pytest.raises(ValueError, match="share one model"):
        StreamGroup([a, b], model=object())
    with pytest.raises(ValueError, match="unique"):
        StreamGroup([a, RunConfig(source="c.mp4", stream="a", engine=a.engine)], model=object())


def test_padded_batches_use_power_of_two_slots():
    """A compiled encoder sees only batch sizes 1, 2, 4 ...; padding never leaks into results."""
    model = _DoublingModel()
    encoder = SharedImageEncoder(model, max_wait=30.0, pad_batches=True)
    members = ["a", "b", "c"]
    encoder._active.update(members)
    images = [torch.full((1, 3, 2, 2), float(k + 1)) for k in range(3)]
    results, errors = _submit_all(encoder, images, members)
    assert errors == [None] * 3 and model.batch_sizes == [4]
    for k, out in enumerate(results):
        assert torch.equal(out["vision_features"], images[k] * 2)
    assert encoder.frames == 3  # real frames, not slots


def test_warmup_leaves_engine_state_untouched(tiny_checkpoint, clip40):
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=TEST_IMAGE_SIZE)
    warmed, cold = StreamingEngine(model, EngineConfig()), StreamingEngine(model, EngineConfig())
    assert warmed.warmup() > 0
    assert (warmed.frame_idx, warmed.object_ids, warmed.state_bytes()) == (-1, [], 0)
    prompt = [Prompt.make(1, box=clip40.box(1, 0))]
    for i in range(3):
        a = warmed.step(clip40.frames[i], prompt if i == 0 else [])
        b = cold.step(clip40.frames[i], prompt if i == 0 else [])
        assert a.frame_idx == b.frame_idx == i
        assert np.array_equal(a.objects[0].mask, b.objects[0].mask)


def test_more_members_than_a_batch_all_get_their_frames():
    model = _DoublingModel()
    encoder = SharedImageEncoder(model, max_wait=0.05, max_batch=2)
    members = [f"m{k}" for k in range(5)]
    images = [torch.full((1, 3, 2, 2), float(k)) for k in range(5)]
    results, errors = _submit_all(encoder, images, members)
    assert errors == [None] * 5
    assert all(torch.equal(results[k]["vision_features"], images[k] * 2) for k in range(5))
    assert max(model.batch_sizes) <= 2 and sum(model.batch_sizes) == 5


def test_batch_steps_run_one_at_a_time_on_the_leading_thread():
    """Every member's step runs on the thread that led its batch, never two at once, and
    a step that fails reaches only its own caller."""
    model = _DoublingModel()
    encoder = SharedImageEncoder(model, max_wait=30.0)
    members = ["a", "b", "c"]
    encoder._active.update(members)
    lock, running, seen = threading.Lock(), [0], []

    def finish_for(k):
        def finish(image, out):
            with lock:
                running[0] += 1
                seen.append((k, threading.current_thread().name, running[0]))
            time.sleep(0.02)
            with lock:
                running[0] -= 1
            if k == 1:
                raise ValueError("step of b failed")
            return float(out["vision_features"].mean())
        return finish

    results, errors = [None] * 3, [None] * 3

    def work(k):
        try:
            image = torch.full((1, 3, 2, 2), float(k + 1))
            results[k] = encoder.run(members[k], lambda: image, finish_for(k))
        except ValueError as exc:
            errors[k] = exc

    threads = [threading.Thread(target=work, args=(k,), name=f"stream-{k}") for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert model.batch_sizes == [3]
    assert {name for _, name, _ in seen} == {seen[0][1]}  # one thread ran all three
    assert max(n for _, _, n in seen) == 1
    assert results[0] == 2.0 and results[2] == 6.0 and results[1] is None
    assert errors[0] is None and errors[2] is None and "b failed" in str(errors[1])
