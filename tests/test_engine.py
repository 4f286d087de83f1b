"""The streaming engine against the official SAM2VideoPredictor, state bounds, bad prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEST_IMAGE_SIZE, save_jpeg_frames
from official import compare, run_engine, run_official

from streamtrack.engine import EngineConfig, ObjectState, Prompt, StreamingEngine
from streamtrack.errors import PromptError, UserError
from streamtrack.models import build_model

# The official reference runs are the slow part of the suite (~1-2 min each on 2 cores).
pytestmark = pytest.mark.timeout(1200)

MIN_IOU = 0.998
MAX_LOGIT_DIFF = 1e-3
REFINE_AT = 20


def make_engine(checkpoint, **config) -> StreamingEngine:
    model = build_model("sam2.1_hiera_tiny", checkpoint, image_size=TEST_IMAGE_SIZE)
    return StreamingEngine(model, EngineConfig(**config))


@pytest.fixture(scope="module")
def frames(clip40, tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpeg")
    return folder, save_jpeg_frames(clip40.frames, folder)


def multi_prompts(clip):
    far = [2.0, 2.0]  # a background click in the corner
    return {
        0: [
            Prompt.make(1, box=clip.box(1, 0)),
            Prompt.make(2, points=[clip.center(2, 0), far], labels=[1, 0]),
            Prompt.make(3, mask=clip.masks[3][0]),
        ],
        REFINE_AT: [
            Prompt.make(1, points=[clip.center(1, REFINE_AT)], labels=[1]),  # refine
            Prompt.make(4, box=clip.box(3, REFINE_AT)),  # a new object mid-stream
        ],
    }


@pytest.fixture(scope="module")
def multi(tiny_checkpoint, clip40, frames):
    folder, decoded = frames
    prompts = multi_prompts(clip40)
    ref = run_official(tiny_checkpoint, folder, len(decoded), prompts, TEST_IMAGE_SIZE)
    engine = make_engine(tiny_checkpoint)
    calls = []
    real_track_step = engine.model._track_step

    def spy(*args, **kwargs):
        calls.append((engine.frame_idx, kwargs["current_vision_feats"][-1].shape[1]))
        return real_track_step(*args, **kwargs)

    engine.model._track_step = spy
    encoder_calls = []
    real_forward_image = engine.model.forward_image
    engine.model.forward_image = lambda img: encoder_calls.append(1) or real_forward_image(img)
    retained = {}

    def record(f, out):
        retained[f] = {oid: engine.retained_frames(oid) for oid in engine.object_ids}

    got = run_engine(engine, decoded, prompts, on_frame=record)
    return ref, got, calls, encoder_calls, retained


def test_equals_official_three_objects_and_later_prompts(multi):
    ref, got, *_ = multi
    worst_iou, worst_diff, where = compare(ref, got)
    assert worst_iou >= MIN_IOU, f"mask IoU {worst_iou} at {where}"
    assert worst_diff <= MAX_LOGIT_DIFF, f"mean |logit diff| {worst_diff} at {where}"
    # The objects are really tracked and distinct (not all empty or all equal).
    last = got.masks[39]
    assert set(last) == {1, 2, 3, 4}
    assert any(m.any() for m in last.values())


def test_objects_are_batched_and_encoder_runs_once_per_frame(multi):
    _, got, calls, encoder_calls, _ = multi
    assert len(encoder_calls) == 40
    per_frame = {}
    for f, batch in calls:
        per_frame.setdefault(f, []).append(batch)
    # Frame 0: three prompts, each decoded alone. Then one batch of three.
    assert per_frame[0] == [1, 1, 1]
    assert all(per_frame[f] == [3] for f in range(1, REFINE_AT))
    # Frame 20: refinement of 1 and new object 4 decoded alone, 2 and 3 tracked together.
    assert sorted(per_frame[REFINE_AT]) == [1, 1, 2]
    # Afterwards 2 and 3 share their memory frames; 1 and 4 were prompted on frame
    # 20 (1 also on 0), so they line up differently.
    assert sorted(per_frame[39]) == [1, 1, 2]


def expected_retained(f, prompt_frames, first):
    """The rule from DESIGN.md, written independently of the engine."""
    tracked = [t for t in range(first, f + 1) if t not in prompt_frames]
    return {
        "cond": sorted(t for t in prompt_frames if t <= f),
        "memory": [t for t in tracked if t >= f - 5],
        "pointer": [t for t in tracked if t >= f - 14],
    }


def test_launching_a_frame_ahead_gives_the_same_outputs(tiny_checkpoint, clip40, frames, multi):
    """launch(f + 1) before finish(f), as a GPU pipeline runs, over the three-object
    clip with its later prompts: bit for bit what one step at a time gives."""
    _, decoded = frames
    _, stepped, *_ = multi
    prompts = multi_prompts(clip40)
    engine = make_engine(tiny_checkpoint)
    masks, logits, pending = {}, {}, None
    for f, frame in enumerate(decoded[: REFINE_AT + 4]):
        launched = engine.launch(frame, prompts.get(f, []), return_logits=True)
        for out in [engine.finish(pending)] if pending is not None else []:
            masks[out.frame_idx] = {o.obj_id: o.mask for o in out.objects}
            logits[out.frame_idx] = {o.obj_id: o.logits for o in out.objects}
        pending = launched
    out = engine.finish(pending)
    masks[out.frame_idx] = {o.obj_id: o.mask for o in out.objects}
    logits[out.frame_idx] = {o.obj_id: o.logits for o in out.objects}
    assert sorted(masks) == list(range(REFINE_AT + 4)) and set(masks[REFINE_AT + 3]) == {1, 2, 3, 4}
    for f in masks:
        for oid, mask in masks[f].items():
            assert np.array_equal(mask, stepped.masks[f][oid]), (f, oid)
            assert torch.equal(logits[f][oid], stepped.logits[f][oid]), (f, oid)


def test_launched_steps_finish_in_order(engine_two_frames, clip40):
    engine = engine_two_frames
    first = engine.launch(clip40.frames[2])
    second = engine.launch(clip40.frames[3])
    with pytest.raises(RuntimeError, match="order"):
        engine.finish(second)
    with pytest.raises(PromptError):  # a bad prompt launches nothing
        engine.launch(clip40.frames[4], [BAD_PROMPTS["box outside"]])
    engine.remove_object(1)  # after its frames were launched: they still report it
    outs = [engine.finish(first), engine.finish(second)]
    assert [(o.frame_idx, [x.obj_id for x in o.objects]) for o in outs] == [(2, [1]), (3, [1])]
    with pytest.raises(RuntimeError, match="order"):
        engine.finish(second)  # once only
    assert engine.step(clip40.frames[4]).objects == ()
    engine.launch(clip40.frames[5])  # abandoned by a caller that stopped
    engine.drop_launched()
    assert engine.step(clip40.frames[6]).frame_idx == 6


def test_memory_bank_holds_exactly_what_sam2_reads(multi):
    *_, retained = multi
    prompt_frames = {1: {0, REFINE_AT}, 2: {0}, 3: {0}, 4: {REFINE_AT}}
    for f, per_obj in retained.items():
        for oid, frames_kept in per_obj.items():
            assert frames_kept == expected_retained(f, prompt_frames[oid], min(prompt_frames[oid])), (f, oid)


@pytest.fixture(scope="module")
def single(tiny_checkpoint, clip40, frames):
    folder, decoded = frames
    prompts = {0: [Prompt.make(1, box=clip40.box(2, 0))]}
    ref = run_official(tiny_checkpoint, folder, len(decoded), prompts, TEST_IMAGE_SIZE)
    return decoded, prompts, ref


def test_equals_official_one_object_and_state_is_flat(tiny_checkpoint, single):
    decoded, prompts, ref = single
    engine = make_engine(tiny_checkpoint)
    sizes = []
    got = run_engine(engine, decoded, prompts, on_frame=lambda f, out: sizes.append(engine.state_bytes()))
    worst_iou, worst_diff, where = compare(ref, got)
    assert worst_iou >= MIN_IOU and worst_diff <= MAX_LOGIT_DIFF, (worst_iou, worst_diff, where)
    # Pointers fill up over 15 frames, then nothing grows.
    assert sizes[1] < sizes[10] < sizes[15]
    assert len(set(sizes[15:])) == 1, sizes


class DropsOldestMemoryFrame(StreamingEngine):
    """Keeps one tracked frame too few for the memory attention."""

    def _prune(self, f):
        super()._prune(f)
        for track in self._tracks.values():
            track.recent.pop(f + 1 - self.mem_window, None)


class KeepsTooFewPointers(StreamingEngine):
    def _prune(self, f):
        self.ptr_window -= 1
        super()._prune(f)
        self.ptr_window += 1


@pytest.mark.parametrize("engine_class", [DropsOldestMemoryFrame, KeepsTooFewPointers])
def test_a_wrongly_pruned_bank_is_caught(tiny_checkpoint, single, engine_class):
    """Proof the comparison can fail: a bank missing one memory or pointer frame."""
    decoded, prompts, ref = single
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=TEST_IMAGE_SIZE)
    got = run_engine(engine_class(model), decoded, prompts)
    _, worst_diff, (frame, _) = compare(ref, got)
    assert worst_diff > MAX_LOGIT_DIFF, f"{engine_class.__name__} went unnoticed ({worst_diff})"
    assert frame >= 16


@pytest.fixture
def engine_two_frames(tiny_checkpoint, clip40):
    engine = make_engine(tiny_checkpoint)
    engine.step(clip40.frames[0], [Prompt.make(1, box=clip40.box(1, 0))])
    engine.step(clip40.frames[1])
    return engine


BAD_PROMPTS = {
    "point outside": Prompt.make(2, points=[[500, 10]]),
    "negative point": Prompt.make(2, points=[[-1, 10]]),
    "empty points": Prompt(2, points=(), labels=()),
    "label not 0/1": Prompt.make(2, points=[[10, 10]], labels=[2]),
    "labels length": Prompt(2, points=((10.0, 10.0),), labels=(1, 0)),
    "nan point": Prompt.make(2, points=[[float("nan"), 10]]),
    "box outside": Prompt.make(2, box=[10, 10, 400, 50]),
    "inverted box": Prompt.make(2, box=[50, 50, 10, 10]),
    "short box": Prompt(2, box=(1.0, 2.0, 3.0)),
    "nothing": Prompt(2),
    "mask shape": Prompt(2, mask=np.ones((10, 10), bool)),
    "mask and box": Prompt(2, mask=np.ones((120, 160), bool), box=(1.0, 1.0, 5.0, 5.0)),
    "object id zero": Prompt.make(0, box=[10, 10, 50, 50]),
    "object id str": Prompt("a", box=(10.0, 10.0, 50.0, 50.0)),
    # Any non-zero value would count as the object: a probability map covered the frame.
    "soft mask": Prompt(2, mask=np.full((120, 160), 0.9, np.float32)),
    "nan mask": Prompt(2, mask=np.full((120, 160), np.nan)),
    # Not numbers: "0" (truthy as a string) would be the whole frame, None nothing.
    "string mask": Prompt(2, mask=np.full((120, 160), "0")),
    "object mask": Prompt(2, mask=np.full((120, 160), None)),
    "labels without points": Prompt(2, box=(10.0, 10.0, 50.0, 50.0), labels=(1,)),
    "a dict": {"obj_id": 2, "box": [10, 10, 50, 50]},
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompt_leaves_engine_untouched(engine_two_frames, clip40, case):
    engine = engine_two_frames
    before = (engine.frame_idx, engine.object_ids, engine.retained_frames(1), engine.state_bytes())
    good = Prompt.make(3, box=clip40.box(3, 2))
    with pytest.raises(PromptError) as info:
        engine.step(clip40.frames[2], [good, BAD_PROMPTS[case]])
    assert "\n" not in str(info.value)
    after = (engine.frame_idx, engine.object_ids, engine.retained_frames(1), engine.state_bytes())
    assert after == before
    out = engine.step(clip40.frames[2])
    assert [o.obj_id for o in out.objects] == [1] and out.frame_idx == 2


def test_a_read_only_frame_is_taken_quietly_on_the_fast_path(tiny_checkpoint, clip40, recwarn):
    """A shared-memory, np.frombuffer or broadcast frame is read only, never written."""
    engine = make_engine(tiny_checkpoint, preprocess="fast")
    frame = clip40.frames[0].copy()
    frame.setflags(write=False)
    engine.step(frame, [Prompt.make(1, box=clip40.box(1, 0))])
    engine.step(np.broadcast_to(clip40.frames[1][:1, :1], clip40.frames[1].shape))
    assert [str(w.message) for w in recwarn] == []


def test_prompt_make_refuses_what_is_not_coordinates():
    with pytest.raises(PromptError, match=r"object 1: points are a list of \(x, y\) pairs"):
        Prompt.make(1, points=[40, 30])  # one flat point
    with pytest.raises(PromptError, match="object 1: a box is 4 numbers"):
        Prompt.make(1, box="20,10,70,50")


def test_float_masks_of_0_and_1_are_the_same_prompt_as_booleans(tiny_checkpoint, clip40):
    outs = []
    for mask in (clip40.masks[2][0], clip40.masks[2][0].astype(np.float64)):
        engine = make_engine(tiny_checkpoint)
        outs.append(engine.step(clip40.frames[0], [Prompt.make(2, mask=mask)]).by_id(2))
    assert outs[0].area > 0 and np.array_equal(outs[0].mask, outs[1].mask)


def test_one_prompt_none_and_numpy_ids_are_accepted(engine_two_frames, clip40):
    engine = engine_two_frames
    out = engine.step(clip40.frames[2], Prompt.make(np.int64(2), box=clip40.box(2, 2)))
    assert [type(o.obj_id) for o in out.objects] == [int, int] and engine.object_ids == [1, 2]
    assert type(engine.object_ids[1]) is int  # json.dumps-able, like every other id
    assert [o.obj_id for o in engine.step(clip40.frames[3], None).objects] == [1, 2]


def test_flipped_frame_views_are_tracked_as_their_copies(tiny_checkpoint, clip40):
    """``bgr[..., ::-1]`` has negative strides, which torch cannot wrap (the GPU path)."""
    outs = []
    for flip in (lambda f: np.ascontiguousarray(f[:, ::-1]), lambda f: f[:, ::-1]):
        engine = make_engine(tiny_checkpoint, preprocess="fast")
        engine.step(flip(clip40.frames[0]), [Prompt.make(1, box=[0, 0, 80, 60])])
        outs.append(engine.step(flip(clip40.frames[1])).by_id(1))
    assert np.array_equal(outs[0].mask, outs[1].mask) and outs[0].score == outs[1].score


def test_step_refuses_while_launched_steps_are_unfinished(engine_two_frames, clip40):
    engine = engine_two_frames
    first = engine.launch(clip40.frames[2])
    with pytest.raises(RuntimeError, match="1 launched step"):
        engine.step(clip40.frames[3], [Prompt.make(2, box=clip40.box(2, 3))])
    assert engine.frame_idx == 2 and engine.object_ids == [1]  # nothing tracked, nothing lost
    assert engine.finish(first).frame_idx == 2
    assert engine.step(clip40.frames[3]).frame_idx == 3


def test_timestamps_and_settings_are_checked_before_anything_changes(engine_two_frames, clip40):
    engine = engine_two_frames
    with pytest.raises(UserError, match="timestamp must be a finite number"):
        engine.step(clip40.frames[2], [Prompt.make(2, box=clip40.box(2, 2))], timestamp="now")
    assert engine.frame_idx == 1 and engine.object_ids == [1]
    for bad in (-1, "3", float("nan"), True):
        with pytest.raises(UserError, match="lost_after must be"):
            EngineConfig(lost_after=bad)
    assert EngineConfig(device=torch.device("cpu")).device == "cpu"
    assert EngineConfig(device=None).device == "auto"
    with pytest.raises(PromptError, match="unknown object id '1'"):
        engine.remove_object("1")


def test_duplicate_prompt_and_unknown_object(engine_two_frames, clip40):
    engine = engine_two_frames
    p = Prompt.make(2, box=clip40.box(2, 2))
    with pytest.raises(PromptError, match="two prompts for object 2"):
        engine.step(clip40.frames[2], [p, p])
    with pytest.raises(PromptError, match="unknown object id 7"):
        engine.remove_object(7)
    assert engine.object_ids == [1]


def test_max_objects_refuses_one_more_object_and_leaves_the_engine_untouched(engine_two_frames, clip40):
    engine = engine_two_frames
    engine.config.max_objects = 2
    before = (engine.frame_idx, engine.object_ids, engine.state_bytes())
    two_more = [Prompt.make(2, box=clip40.box(2, 2)), Prompt.make(3, box=clip40.box(3, 2))]
    with pytest.raises(PromptError, match="object 2: 1 objects are tracked, 2 new ones asked for and "
                                          "max_objects is 2; remove one first"):
        engine.step(clip40.frames[2], two_more)
    assert (engine.frame_idx, engine.object_ids, engine.state_bytes()) == before
    # One more fits; refining a tracked object needs no room.
    out = engine.step(clip40.frames[2], [two_more[0], Prompt.make(1, box=clip40.box(1, 2))])
    assert [o.obj_id for o in out.objects] == [1, 2]
    engine.remove_object(1)
    assert [o.obj_id for o in engine.step(clip40.frames[3], [two_more[1]]).objects] == [2, 3]


def test_max_objects_with_nothing_tracked_names_the_new_objects_not_one_to_remove(tiny_checkpoint, clip40):
    engine = make_engine(tiny_checkpoint, max_objects=2)
    three = [Prompt.make(k, box=clip40.box(k, 0)) for k in (1, 2, 3)]
    with pytest.raises(PromptError, match=r"^object 1: 0 objects are tracked, 3 new ones asked for and "
                                          r"max_objects is 2; raise max_objects$"):
        engine.step(clip40.frames[0], three)


def test_an_image_model_is_refused_by_name(tiny_checkpoint):
    image_model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=TEST_IMAGE_SIZE, kind="image")
    with pytest.raises(UserError, match="runs SAM 2's video model, got a SAM2Base: build it with"):
        StreamingEngine(image_model)


def test_a_frame_size_change_is_tracked_at_the_new_size_and_an_aspect_change_warned(
        engine_two_frames, clip40, caplog):
    engine = engine_two_frames
    with caplog.at_level("WARNING", logger="streamtrack.engine"):
        same_aspect = np.ascontiguousarray(np.repeat(np.repeat(clip40.frames[2], 2, 0), 2, 1))
        out = engine.step(same_aspect)
        assert out.objects[0].mask.shape == (240, 320) and not caplog.records
        out = engine.step(np.ascontiguousarray(clip40.frames[3][:, :60]))
        assert out.objects[0].mask.shape == (120, 60)
        assert [r.getMessage() for r in caplog.records] == [
            "frame size changed from 320x240 to 60x120 while tracking 1 object(s): their memory is "
            "of frames with another aspect ratio; if the masks drift, reset() and prompt again"]
        engine.step(np.ascontiguousarray(clip40.frames[4][:, :60]))  # once per change
        assert len(caplog.records) == 1


def test_bad_frames(engine_two_frames):
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), [1, 2, 3]):
        with pytest.raises(UserError, match="frame"):
            engine_two_frames.step(bad)
    assert engine_two_frames.frame_idx == 1


def test_add_remove_reset(engine_two_frames, clip40):
    engine = engine_two_frames
    out = engine.step(clip40.frames[2], [Prompt.make(2, box=clip40.box(2, 2))])
    assert [o.obj_id for o in out.objects] == [1, 2] and out.by_id(2).prompted
    assert engine.retained_frames(2)["cond"] == [2]
    engine.remove_object(1)
    out = engine.step(clip40.frames[3])
    assert [o.obj_id for o in out.objects] == [2]
    before = engine.state_bytes()
    engine.reset()
    assert engine.object_ids == [] and engine.state_bytes() < before / 2  # only shared constants left
    out = engine.step(clip40.frames[4])
    assert out.objects == () and out.frame_idx == 4


def test_outputs_are_consistent(engine_two_frames, clip40):
    out = engine_two_frames.step(torch.from_numpy(clip40.frames[2]))
    o = out.by_id(1)
    assert o.mask.shape == (120, 160) and o.mask.dtype == bool
    assert o.area == int(o.mask.sum())
    if o.area:
        ys, xs = np.nonzero(o.mask)
        assert o.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    assert 0.0 <= o.score <= 1.0 and abs(o.score - 1 / (1 + np.exp(-o.object_score_logit))) < 1e-6
    assert 0.0 <= o.iou <= 1.0
    assert o.state == (ObjectState.VISIBLE if o.object_score_logit > 0 else ObjectState.OCCLUDED)


@pytest.mark.parametrize("lost_after,state", [(0.0, ObjectState.LOST), (10.0, ObjectState.OCCLUDED)])
def test_absent_object_is_occluded_then_lost(tiny_checkpoint, clip40, lost_after, state):
    engine = make_engine(tiny_checkpoint, lost_after=lost_after)
    empty = np.zeros((120, 160), bool)  # "the object is not here": score logit -10
    out = engine.step(clip40.frames[0], [Prompt(5, mask=empty)], timestamp=100.0)
    o = out.by_id(5)
    assert o.object_score_logit < 0 and o.area == 0 and o.bbox is None
    assert o.state == state


def test_hole_filling(tiny_checkpoint):
    from streamtrack.engine import fill_holes

    logits = torch.full((1, 1, 16, 16), 5.0)
    logits[0, 0, 4:6, 4:6] = -3.0  # a 4-pixel hole
    logits[0, 0, 8:16, 8:16] = -3.0  # a 64-pixel region, not a hole to fill at 8
    filled = fill_holes(logits, 8)
    assert (filled[0, 0, 4:6, 4:6] == 0.1).all()
    assert (filled[0, 0, 8:16, 8:16] == -3.0).all()
    assert torch.equal(filled[0, 0, :4], logits[0, 0, :4])


def test_capped_conditioning_frames_equal_official(tiny_checkpoint, clip40, frames):
    """max_cond_frames=2: the engine attends to (and keeps) the two most recent prompted frames,
    as the official max_cond_frames_in_attn selects them, in its order, and still equals the
    official predictor."""
    folder, decoded = frames
    prompts = {
        0: [Prompt.make(1, box=clip40.box(1, 0))],
        6: [Prompt.make(1, points=[clip40.center(1, 6)])],
        12: [Prompt.make(1, box=clip40.box(1, 12))],
    }
    n = 36
    ref = run_official_capped(tiny_checkpoint, folder, prompts, cap=2)
    engine = make_engine(tiny_checkpoint, max_cond_frames=2)
    kept = {}
    got = run_engine(engine, decoded[:n], prompts,
                     on_frame=lambda f, out: kept.__setitem__(f, engine.retained_frames(1)["cond"]))
    ref.masks = {f: m for f, m in ref.masks.items() if f < n}
    worst_iou, worst_diff, where = compare(ref, got)
    assert worst_iou >= MIN_IOU and worst_diff <= MAX_LOGIT_DIFF, (worst_iou, worst_diff, where)
    # Bit for bit, once frame 0 is dropped too: the kept frames are attended to in the order
    # the official selects them from all three (attended oldest first: ~5e-6 from frame 18).
    assert worst_diff == 0.0, (worst_diff, where)
    # Unselected frame 0 stays while frame f+1 still reads its pointer (f+1-15 <= 0), then goes.
    assert kept[14] == [0, 6, 12] and kept[15] == [6, 12] and kept[35] == [6, 12]


def test_engines_sharing_a_model_each_attend_with_their_own_cap(tiny_checkpoint, clip40):
    """sam2 reads the conditioning-frame cap from the model: two engines on one model (a
    StreamGroup's streams) must not run with the cap of whichever was built last."""
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=TEST_IMAGE_SIZE)
    engines = {"uncapped": StreamingEngine(model, EngineConfig()),
               "capped": StreamingEngine(model, EngineConfig(max_cond_frames=2))}  # built last
    seen: dict[str, set[int]] = {name: set() for name in engines}
    stepping = []
    real = model._track_step

    def recording(*args, **kwargs):
        seen[stepping[-1]].add(model.max_cond_frames_in_attn)
        return real(*args, **kwargs)

    model._track_step = recording
    for f in range(3):
        for name, engine in engines.items():
            stepping.append(name)
            engine.step(clip40.frames[f], [Prompt.make(1, box=clip40.box(1, f))] if f < 2 else None)
    assert seen == {"uncapped": {-1}, "capped": {2}}


def test_engine_config_values_of_the_wrong_type_are_user_errors():
    """Checked when the config is made: 2.5 conditioning frames would fail on the third
    prompted frame, inside a step that has already changed the engine's state."""
    for bad, message in [({"max_cond_frames": 2.5}, "max_cond_frames must be an integer >= 2"),
                         ({"max_cond_frames": "3"}, "max_cond_frames must be an integer >= 2"),
                         ({"max_cond_frames": 1}, "max_cond_frames must be an integer >= 2"),
                         ({"compile_slots": "4"}, "compile_slots must be an integer >= 1"),
                         ({"compile_slots": 2.5}, "compile_slots must be an integer >= 1"),
                         ({"checkpoint": 123}, "checkpoint must be a path")]:
        with pytest.raises(UserError, match=message):
            EngineConfig(**bad)
    assert EngineConfig(max_cond_frames=None, checkpoint=Path("x.pt")).max_cond_frames is None


def run_official_capped(checkpoint, folder, prompts, cap):
    import official

    real_build = official.build_model

    def build_capped(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.max_cond_frames_in_attn = cap
        return model

    official.build_model = build_capped
    try:
        return run_official(checkpoint, folder, 36, prompts, TEST_IMAGE_SIZE)
    finally:
        official.build_model = real_build


def test_fast_preprocessing_is_close_to_exact_and_takes_tensors(tiny_checkpoint, clip40):
    """``fast`` (device resize, the CUDA default) differs from ``exact`` only by the resize filter."""
    exact, fast = make_engine(tiny_checkpoint), make_engine(tiny_checkpoint, preprocess="fast")
    assert (exact.preprocess, fast.preprocess) == ("exact", "fast")  # "auto" on CPU is exact
    frame = clip40.frames[5]
    a, b = exact._preprocess(frame), fast._preprocess(frame)
    assert a.shape == b.shape == (1, 3, TEST_IMAGE_SIZE, TEST_IMAGE_SIZE)
    diff = (a - b).abs()
    assert 0 < float(diff.mean()) < 0.05  # normalised units: ~1 % of the range
    assert torch.equal(fast._preprocess(torch.from_numpy(frame)), b)
    assert torch.equal(exact._preprocess(torch.from_numpy(frame)), a)
    with pytest.raises(UserError, match="preprocess"):
        make_engine(tiny_checkpoint, preprocess="nearest")


def test_dense_position_encoding_is_computed_once_and_bit_identical(tiny_checkpoint):
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=TEST_IMAGE_SIZE)
    encoder = model.sam_prompt_encoder
    with torch.inference_mode():
        reference = encoder.get_dense_pe()  # sam2's own, before the engine wraps it
    StreamingEngine(model, EngineConfig())
    StreamingEngine(model, EngineConfig())  # a second engine on the model wraps it once
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference_bf16 = encoder.get_dense_pe()  # outside inference mode: sam2's method
    with torch.inference_mode():
        first, again = encoder.get_dense_pe(), encoder.get_dense_pe()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another autocast state: its own entry
            bf16 = encoder.get_dense_pe()
    assert first is again and torch.equal(first, reference)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, reference_bf16)
    assert len(encoder.streamtrack_dense_pe_cache) == 2
    with torch.no_grad():  # outside inference mode: sam2's method, nothing cached
        assert encoder.get_dense_pe() is not first and torch.equal(encoder.get_dense_pe(), reference)
    assert len(encoder.streamtrack_dense_pe_cache) == 2


def test_position_embedding_is_computed_once_and_bit_identical(tiny_checkpoint):
    model = build_model("sam2.1_hiera_tiny", tiny_checkpoint, image_size=TEST_IMAGE_SIZE)
    trunk = model.image_encoder.trunk
    hw = (TEST_IMAGE_SIZE // 4, TEST_IMAGE_SIZE // 4)  # after the stride-4 patch embedding
    with torch.inference_mode():
        reference = trunk._get_pos_embed(hw)  # sam2's own, before the engine wraps it
    StreamingEngine(model, EngineConfig())
    StreamingEngine(model, EngineConfig())  # a second engine on the model wraps it once
    with torch.inference_mode():
        first, again = trunk._get_pos_embed(hw), trunk._get_pos_embed(hw)
    assert first is again and torch.equal(first, reference)
    assert len(trunk.streamtrack_pos_cache) == 1
    with torch.no_grad():  # outside inference mode: sam2's method, nothing cached
        assert torch.equal(trunk._get_pos_embed(hw), reference)
    assert len(trunk.streamtrack_pos_cache) == 1
