"""The tracker's side of the control channel: ``prompt_applied`` status events, and what
each request does to the tracker's state (no model needed: a stand-in engine)."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import av
import numpy as np
import pytest

from streamtrack.control import AddPrompt, ControlClient, parse_command
from streamtrack.engine import EngineConfig, FrameOutput, Prompt
from streamtrack.errors import PromptError, UserError
from streamtrack.pipeline import RunConfig, Tracker
from streamtrack.protocol import encode_mask
from streamtrack.synthetic import make_clip, write_video


class TrackedIds:
    """Stands in for the engine: the ids it tracks and the prompts each launch got; it
    refuses prompts for object 99, as a bad prompt."""

    def __init__(self, ids=()):
        self.ids = list(ids)
        self.launched: list[list[Prompt]] = []

    @property
    def object_ids(self) -> list[int]:
        return list(self.ids)

    def remove_object(self, obj_id: int) -> None:
        if obj_id not in self.ids:
            raise PromptError(f"unknown object id {obj_id}; known: {self.ids}")
        self.ids.remove(obj_id)

    def reset(self) -> None:
        self.ids.clear()

    def launch(self, image, prompts, timestamp=None):
        if any(p.obj_id == 99 for p in prompts):
            raise PromptError("point (900, 10) is outside the 64x48 frame")
        self.launched.append(list(prompts))
        self.ids += [p.obj_id for p in prompts if p.obj_id not in self.ids]
        return len(self.launched) - 1

    def finish(self, index):
        return FrameOutput(index, 64, 48, (), time.time(), time.time())

    def warmup_once(self):
        return None

    def state_bytes(self) -> int:
        return 0


class StubPublisher:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def publish_status(self, kind, **data):
        self.events.append((kind, data))


def record_emitted(monkeypatch) -> list[tuple]:
    """What the tracker hands its emitter, in order: ``("result", seq, obj_ids)`` and
    ``(kind, data)`` of each status event published after the results before it."""
    import streamtrack.pipeline as pipeline

    calls: list[tuple] = []
    make = pipeline.make_emitter

    def recording(mode, cfg, on_published):
        emitter = make(mode, cfg, on_published)
        submit, after = emitter.submit, emitter.publish_status_after_results

        def submit_recorded(result, masks, image):
            calls.append(("result", result.seq, tuple(o.obj_id for o in result.objects)))
            submit(result, masks, image)

        def after_recorded(kind, **data):
            calls.append((kind, data))
            after(kind, **data)

        emitter.submit, emitter.publish_status_after_results = submit_recorded, after_recorded
        return emitter

    monkeypatch.setattr(pipeline, "make_emitter", recording)
    return calls


def object_one(visible: bool = True):
    from streamtrack.engine import ObjectOutput, ObjectState

    mask = np.zeros((48, 64), bool)
    mask[5:20, 5:30] = True
    return ObjectOutput(1, mask, 0.9, 2.0, 0.8, (5, 5, 30, 20), int(mask.sum()),
                        ObjectState.VISIBLE if visible else ObjectState.OCCLUDED, False)


def tracker_with(ids=(), max_objects=64, frame_size=(48, 64), prompts=None):
    tracker = Tracker(RunConfig(source="clip.mp4", engine=EngineConfig(max_objects=max_objects),
                                prompts=prompts or {}), engine=TrackedIds(ids))
    tracker._publisher = StubPublisher()
    tracker.frame_size = frame_size
    return tracker


def add(tracker, obj_id, **prompt):
    return tracker._controls.add_prompt(parse_command({"cmd": "add_prompt", "obj_id": obj_id, **prompt}))


def frame(frame_id):
    return SimpleNamespace(image=np.zeros((48, 64, 3), np.uint8), capture_monotonic=1.0, frame_id=frame_id,
                           height=48, width=64, pts=None)


def test_applied_control_prompts_are_reported_with_their_frame_and_coordinates():
    tracker = tracker_with()
    from_file = Prompt.make(1, box=[1, 2, 30, 40])
    requested = [Prompt.make(2, points=[[10.5, 20.25], [3, 4]], labels=[1, 0]),
                 Prompt.make(3, box=[5, 6, 50, 45]),
                 Prompt(4, mask=np.ones((48, 64), bool))]
    tracker._launch(frame(17), [from_file], requested)
    assert [p.obj_id for p in tracker.engine.launched[0]] == [1, 2, 3, 4]
    events = tracker._publisher.events
    # Only control prompts: a prompts-file entry is the user's own, known in advance.
    assert [k for k, _ in events] == ["prompt_applied"] * 3
    assert events[0][1] == {"obj_id": 2, "frame_id": 17, "seq": 0, "points": ((10.5, 20.25), (3.0, 4.0)),
                            "labels": (1, 0), "box": None, "mask": False}
    assert events[1][1] == {"obj_id": 3, "frame_id": 17, "seq": 0, "points": None, "labels": None,
                            "box": (5.0, 6.0, 50.0, 45.0), "mask": False}
    assert events[2][1]["obj_id"] == 4 and events[2][1]["mask"] is True


def test_dropped_prompts_are_reported_as_errors_not_applied():
    tracker = tracker_with()
    tracker._launch(frame(3), [Prompt.make(1, box=[1, 2, 30, 40])], [Prompt.make(99, points=[[900, 10]])])
    assert [p.obj_id for p in tracker.engine.launched[0]] == [1]  # the frame still runs, without it
    (kind, data), = tracker._publisher.events
    assert kind == "error" and "prompt dropped" in data["message"]


def test_a_prompt_that_does_not_fit_the_frame_is_dropped_alone():
    reports = []
    tracker = Tracker(RunConfig(source="clip.mp4"), engine=TrackedIds(),
                      notify=lambda kind, data: reports.append((kind, data)))
    tracker._publisher = StubPublisher()
    off_frame = Prompt.make(5, box=[100, 100, 550, 325])  # drawn on a 640x360 placeholder
    tracker._controls.pending = [off_frame, Prompt.make(6, box=[5, 6, 50, 45])]
    tracker._drop_unfitting(frame(3))  # as the loop does with each frame it reads
    tracker._launch(frame(3), [], tracker._controls.pending)
    assert [p.obj_id for p in tracker.engine.launched[0]] == [6]
    events = [(k, d.get("obj_id")) for k, d in tracker._publisher.events]
    assert events == [("error", None), ("prompt_applied", 6)]
    assert "object 5" in tracker._publisher.events[0][1]["message"]
    assert reports == [("unqueued", {"obj_id": 5})]  # a supervisor does not queue it again


def test_no_control_prompt_no_event():
    tracker = tracker_with()
    tracker._launch(frame(0), [Prompt.make(1, box=[1, 2, 30, 40])], [])
    assert tracker._publisher.events == []


def test_removing_an_object_still_queued_cancels_it():
    """Added and removed between two frames (paused, or a pipelining client): the object
    never appears, and the removal is not reported as a failure."""
    tracker = tracker_with(ids=[1])
    controls = tracker._controls
    add(tracker, 5, box=[1, 2, 30, 40])
    assert controls.remove_object(5) == {"objects": [1]}
    assert controls.pending == []
    # A tracked object with a refinement queued: both go.
    add(tracker, 1, points=[[3, 4]])
    assert controls.remove_object(1) == {"objects": []} and controls.pending == []
    with pytest.raises(PromptError, match="unknown object id 7"):
        controls.remove_object(7)
    tracker._launch(frame(0), [], controls.pending)
    assert tracker.engine.launched == [[]]


def test_status_agrees_with_removals_and_queued_prompts_before_the_next_frame():
    """A paused tracker has no next result to drop a removed object from: its status
    must not list it, and it lists what is queued."""
    tracker = tracker_with(ids=[1, 4])
    tracker._object_states = {1: "visible", 4: "occluded"}  # the last result's
    controls = tracker._controls
    controls.pause()
    assert controls.status()["objects"] == {"1": "visible", "4": "occluded"}
    assert controls.status()["queued"] == []
    controls.remove_object(4)
    add(tracker, 7, box=[1, 2, 30, 40])
    add(tracker, 1, points=[[3, 4]])
    status = controls.status()
    assert status["objects"] == {"1": "visible"} and status["queued"] == [1, 7]
    controls.reset()
    assert controls.status()["objects"] == {} and controls.status()["queued"] == []


def test_status_keeps_a_removed_object_out_while_a_frame_launched_before_still_has_it():
    """With launch_ahead the result after a removal can come from a frame launched before
    it: the object is still in that result, and must not come back into the status."""
    from streamtrack.protocol import FrameResult, ObjectResult

    def result(*ids):
        return FrameResult(stream="cam0", seq=0, frame_id=0, pts=None, width=64, height=48, objects=tuple(
            ObjectResult(obj_id=k, score=0.9, state="visible", bbox=(1, 2, 3, 4), area=4) for k in ids))

    emitter = SimpleNamespace(publish_status_after_results=lambda kind, **data: None)
    tracker = tracker_with(ids=[1, 4, 5])
    tracker._object_states = {1: "visible", 4: "visible", 5: "visible"}
    controls = tracker._controls
    controls.remove_object(4)
    tracker._status_changes(result(1, 4, 5), emitter)  # launched before the removal
    assert controls.status()["objects"] == {"1": "visible", "5": "visible"}
    tracker._status_changes(result(1, 5), emitter)  # gone from the results: nothing left to hide
    assert tracker._removed == set()
    controls.remove_object(5)
    add(tracker, 5, box=[1, 2, 30, 40])  # back before any result said it was gone
    tracker._status_changes(result(1, 5), emitter)
    assert controls.status()["objects"] == {"1": "visible", "5": "visible"}
    tracker.engine.ids.append(6)  # first prompted on the frame in flight at a reset
    controls.reset()
    tracker._status_changes(result(1, 5, 6), emitter)
    assert controls.status()["objects"] == {}


def test_max_objects_counts_tracked_and_queued_objects():
    tracker = tracker_with(ids=[1], max_objects=3)
    add(tracker, 2, box=[1, 2, 30, 40])
    add(tracker, 3, box=[1, 2, 30, 40])
    with pytest.raises(PromptError, match="object 4: 3 objects are tracked, queued or .*max_objects is 3"):
        add(tracker, 4, box=[1, 2, 30, 40])
    add(tracker, 1, points=[[5, 5]])  # refining a known object needs no room
    add(tracker, 3, points=[[6, 6]])  # nor does replacing a queued prompt
    tracker._controls.remove_object(2)
    add(tracker, 4, box=[1, 2, 30, 40])
    assert sorted(p.obj_id for p in tracker._controls.pending) == [1, 3, 4]


def test_room_is_kept_for_the_prompts_files_objects_still_to_come():
    """Refusing a prompts-file object later would stop the run: a control prompt is refused
    now instead."""
    tracker = tracker_with(ids=[1], max_objects=3, prompts={5: [Prompt.make(9, box=[1, 2, 30, 40])]})
    add(tracker, 2, box=[1, 2, 30, 40])
    with pytest.raises(PromptError, match="object 3: 3 objects are tracked, queued or prompted later"):
        add(tracker, 3, box=[1, 2, 30, 40])
    tracker._prompt_frames = []  # frame 5 reached: object 9 is tracked by now, or never will be
    add(tracker, 3, box=[1, 2, 30, 40])


def test_prompts_naming_more_objects_than_max_objects_are_refused_up_front():
    prompts = {0: [Prompt.make(1, box=[0, 0, 5, 5]), Prompt.make(2, box=[0, 0, 5, 5])],
               9: [Prompt.make(3, box=[0, 0, 5, 5]), Prompt.make(1, points=[[1, 1]])]}
    with pytest.raises(UserError, match="the prompts name 3 objects and max_objects is 2"):
        RunConfig(source="clip.mp4", prompts=prompts, engine=EngineConfig(max_objects=2))
    RunConfig(source="clip.mp4", prompts=prompts, engine=EngineConfig(max_objects=3))
    with pytest.raises(UserError, match="max_objects must be a positive integer"):
        EngineConfig(max_objects=0)


@pytest.mark.parametrize("field, value, message", [
    ("fill_hole_area", -1, r"fill_hole_area must be an integer >= 0 \(pixels\), got -1"),
    ("fill_hole_area", 2.5, "fill_hole_area must be an integer >= 0"),
    ("bf16", "no", "bf16 must be True or False, got 'no'"),  # a true string: bf16 would stay on
    ("compile", 1, "compile must be True or False, got 1"),
])
def test_engine_config_values_of_the_wrong_kind_are_refused(field, value, message):
    with pytest.raises(UserError, match=message):
        EngineConfig(**{field: value})


def test_a_mask_prompt_is_checked_against_the_frame_before_it_is_decoded():
    """A few bytes of RLE can stand for a gigapixel mask: its size is compared first."""
    huge = {"size": [16384, 16384], "counts": "PPPPP8"}  # one run of 16384 * 16384 zeros
    fits = encode_mask(np.ones((48, 64), bool))
    with mock.patch.object(AddPrompt, "mask_array", side_effect=AssertionError("decoded")):
        with pytest.raises(PromptError, match=r"shape \(16384, 16384\) does not match the frame \(48, 64\)"):
            add(tracker_with(), 2, mask=huge)
        with pytest.raises(PromptError, match="no frame has come yet"):
            add(tracker_with(frame_size=None), 2, mask=fits)
    tracker = tracker_with()
    add(tracker, 2, mask=fits)
    assert tracker._controls.pending[0].mask.shape == (48, 64)


def test_a_new_object_whose_id_is_taken_gets_the_next_free_one():
    """Two viewers each pick the next id for their new object: the second one's is
    renumbered (and the reply says which), not a replacement of the first one's object."""
    tracker = tracker_with(ids=[1, 2], prompts={5: [Prompt.make(7, box=[1, 2, 30, 40])]})
    assert add(tracker, 3, box=[1, 2, 30, 40], new=True)["obj_id"] == 3  # free
    assert add(tracker, 3, box=[5, 6, 30, 40], new=True)["obj_id"] == 8  # 3 queued, 7 to come
    assert add(tracker, 3, points=[[10, 10]])["obj_id"] == 3  # not new: a refinement of 3
    assert [p.obj_id for p in tracker._controls.pending] == [8, 3]
    with pytest.raises(PromptError, match="new must be true or false"):
        add(tracker, 9, box=[1, 2, 30, 40], new="yes")


def test_a_new_object_past_the_highest_id_gets_the_lowest_free_one():
    """Ids stop at 2**31 - 1: one more would be tracked but could never be removed or refined."""
    tracker = tracker_with(ids=[1, 2**31 - 1])
    assert add(tracker, 2**31 - 1, box=[1, 2, 30, 40], new=True)["obj_id"] == 2
    # With --save-masks, past the PNGs' 255: not 256, which the writer could not store.
    pngs = tracker_with(ids=[1, 255])
    pngs.config = replace(pngs.config, save_masks="masks")
    assert add(pngs, 255, box=[1, 2, 30, 40], new=True)["obj_id"] == 2
    full = tracker_with(ids=[1, 2], max_objects=2)
    with pytest.raises(PromptError, match="^a new object: 2 objects are tracked"):  # not "object 3"
        add(full, 1, box=[1, 2, 30, 40], new=True)


def test_pause_and_resume_are_announced_to_subscribers():
    tracker = tracker_with(ids=[1])
    controls = tracker._controls
    assert controls.pause() == {"paused": True}
    controls.pause()  # already paused: nothing new to say
    assert controls.resume() == {"paused": False}
    controls.resume()
    assert tracker._publisher.events == [
        ("tracker_state", {"old": "running", "new": "paused"}),
        ("tracker_state", {"old": "paused", "new": "running"}),
    ]


@pytest.mark.parametrize("in_flight", [False, True])
def test_queued_for_frame_is_the_seq_of_the_result_the_prompt_lands_on(in_flight):
    tracker = tracker_with()
    tracker._seq = 41  # results published so far
    if in_flight:  # launched ahead: one frame's result is still to come before ours
        tracker._in_flight = object()
    reply = add(tracker, 2, box=[1, 2, 30, 40])
    tracker._launch(frame(900), [], tracker._controls.pending)
    (kind, data), = tracker._publisher.events
    assert kind == "prompt_applied" and data["frame_id"] == 900
    assert reply["queued_for_frame"] == data["seq"] == 41 + in_flight


@contextlib.contextmanager
def loading_tracker(monkeypatch, run: RunConfig, engine: TrackedIds):
    """A tracker on a thread, its model "loading" until the block sets the event it is
    given: (a control client to it, the event, what it reported besides "bound", the
    summary once it has run).  The block must let it load; the tracker then runs out."""
    release = threading.Event()

    def slow_load(config):
        assert release.wait(30)
        return engine

    monkeypatch.setattr("streamtrack.engine.StreamingEngine.from_config", slow_load)
    bound: dict = {}
    said: list = []

    def notify(kind, data):
        if kind == "bound":
            bound.update(data)
        else:
            said.append((kind, data.get("obj_id")))

    tracker = Tracker(run, notify=notify)
    summary: dict = {}
    thread = threading.Thread(target=lambda: summary.update(run=tracker.run()), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while "control" not in bound and time.monotonic() < deadline:
            time.sleep(0.01)
        with ControlClient(bound["control"], timeout=5) as client:
            yield client, release, said, summary
        thread.join(30)
        assert not thread.is_alive()
    finally:
        release.set()
        tracker.stop()


def test_control_requests_are_answered_while_the_model_loads(tmp_path, monkeypatch):
    """Loading takes seconds to minutes: status answers, prompts queue for the first frame,
    and what needs the model says so, instead of the requests waiting unanswered."""
    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    engine = TrackedIds()
    run = RunConfig(source=str(video), control="tcp://127.0.0.1:0", progress=False)
    with loading_tracker(monkeypatch, run, engine) as (client, release, _, summary):
        assert client.status()["frames"] == 0
        assert client.add_prompt(1, box=[1, 2, 30, 40])["queued_for_frame"] == 0
        assert client.reset() == {"ok": True, "objects": []}  # drops what is queued
        assert client.add_prompt(1, box=[1, 2, 30, 40])["ok"]
        assert client.remove_object(1) == {"ok": True, "objects": []}  # cancelled while queued
        reply = client.request({"cmd": "remove_object", "obj_id": 9})
        assert reply == {"ok": False, "error": "the model is still loading; try again in a moment"}
        assert client.add_prompt(2, box=[1, 2, 30, 40])["ok"]
        release.set()
    assert summary["run"].frames == 6
    assert [p.obj_id for p in engine.launched[0]] == [2]


def test_a_later_prompt_that_does_not_fit_the_first_frame_is_warned_about_at_once(tmp_path, caplog):
    """A prompts-file entry for a later frame that does not fit the source is said on its
    first frame, not only when its own frame comes (hours into a live stream); it ends the
    run there, unless the source's size has changed by then."""
    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    engine = TrackedIds()
    run = RunConfig(source=str(video), progress=False,
                    prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])],
                             4: [Prompt.make(2, box=[1, 2, 500, 40])]})
    message = "object 2: box corner (500, 40) is outside the 64x48 frame (prompted for frame 4)"
    with pytest.raises(PromptError, match=f"^{re.escape(message)}$"):
        Tracker(run, engine=engine).run()
    warned = [r for r in caplog.records if r.levelname == "WARNING" and message in r.getMessage()]
    assert len(warned) == 1 and warned[0].getMessage().endswith("unless the source's size changes by then")
    assert len(engine.launched) == 4  # frames 0-3 tracked, warned from the first


def test_a_first_prompt_that_does_not_fit_leaves_the_first_frame_waiting(tmp_path, monkeypatch):
    """A prompt sent while the model loads is checked against the first frame when it
    comes: one that does not fit is dropped, and the first frame waits on for a prompt
    instead of going out without objects."""
    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    engine = TrackedIds()
    run = RunConfig(source=str(video), control="tcp://127.0.0.1:0", progress=False, wait_for_prompt=True)
    with loading_tracker(monkeypatch, run, engine) as (client, release, said, summary):
        assert client.add_prompt(5, box=[100, 100, 550, 325])["queued_for_frame"] == 0
        release.set()
        deadline = time.monotonic() + 20
        while ("unqueued", 5) not in said and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.status()["frames"] == 0 and not engine.launched  # still waiting
        assert client.add_prompt(6, box=[1, 2, 30, 40])["queued_for_frame"] == 0
    assert summary["run"].frames == 6
    assert [p.obj_id for p in engine.launched[0]] == [6]


def test_a_file_whose_objects_are_all_removed_goes_on_to_its_end(tmp_path, monkeypatch):
    """Only the first frame waits for a prompt: a file whose last object was removed
    (remove_object, reset) waited for a new one, and a script that removed it and then
    waited for the end of the file waited forever."""
    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")

    class AllRemovedAfterTwo(TrackedIds):
        def launch(self, image, prompts, timestamp=None):
            index = super().launch(image, prompts, timestamp)
            if index == 1:
                self.ids.clear()  # as a remove_object answered between frames 1 and 2
            return index

    engine = AllRemovedAfterTwo()
    run = RunConfig(source=str(video), control="tcp://127.0.0.1:0", progress=False, wait_for_prompt=True)
    with loading_tracker(monkeypatch, run, engine) as (client, release, _, summary):
        release.set()
        assert client.add_prompt(1, box=[1, 2, 30, 40])["ok"]
    assert summary["run"].frames == 6
    assert [[p.obj_id for p in ps] for ps in engine.launched] == [[1], [], [], [], [], []]


def test_a_files_time_goes_on_where_its_timestamps_start_over():
    """lost_after counts a file's own time (pts).  In clips joined end to end the pts
    start over: an object lost 0.5 s after it went was "occluded" again there, and lost
    only once the second clip's time had passed the first's."""
    tracker = Tracker(RunConfig(source="joined.ts", progress=False))
    times = [tracker._video_time(pts) for pts in (0.0, 0.1, 0.2, 0.2, 0.0, 0.1, 5.0, 1.0)]
    assert times == pytest.approx([0.0, 0.1, 0.2, 0.2, 0.3, 0.4, 5.3, 5.4])


@pytest.mark.parametrize("request_", ["remove_object", "reset"])
def test_a_restarted_tracker_drops_what_it_would_bring_back_when_told_while_it_loads(
        tmp_path, monkeypatch, request_):
    """After a restart the objects come back on the first frame (their last masks) with
    the prompts queued before it.  A remove_object or reset answered while the model loads
    holds for them too: they do not come back after the reply said they were gone."""
    from streamtrack.pipeline import Resume

    video = write_video(make_clip(4, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    engine = TrackedIds()
    seed = tuple(Prompt(i, mask=np.ones((48, 64), bool)) for i in (1, 2, 3))
    resume = Resume(seed=seed, queued=(Prompt.make(7, box=[1, 2, 30, 40]),), restarts=1,
                    object_states={1: "visible", 2: "visible", 3: "occluded"})
    run = RunConfig(source=str(video), control="tcp://127.0.0.1:0", progress=False, resume=resume)
    with loading_tracker(monkeypatch, run, engine) as (client, release, said, _):
        assert set(client.status()["objects"]) == {"1", "2", "3"}
        if request_ == "remove_object":
            assert client.remove_object(2) == {"ok": True, "objects": [1, 3]}
            assert client.remove_object(7) == {"ok": True, "objects": [1, 3]}  # the carried prompt
            assert set(client.status()["objects"]) == {"1", "3"}
        else:
            assert client.reset() == {"ok": True, "objects": []}
            assert client.status()["objects"] == {}
            assert client.add_prompt(5, box=[1, 2, 30, 40])["ok"]
        release.set()
    first = [p.obj_id for p in engine.launched[0]]
    assert first == ([1, 3] if request_ == "remove_object" else [5])
    # The supervisor hears it, for the restart after this one.
    unseeded = [obj_id for kind, obj_id in said if kind == "unseeded"]
    assert unseeded == ([2] if request_ == "remove_object" else [None])


def test_a_port_left_to_the_system_is_reported(tmp_path, caplog):
    """Nobody can subscribe to port 0 until told which port it became."""
    video = write_video(make_clip(3, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    bound: dict = {}
    run = RunConfig(source=str(video), publish="0", control="tcp://127.0.0.1:0",
                    progress=False, prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
    tracker = Tracker(run, engine=TrackedIds(),
                      notify=lambda kind, data: bound.update(data) if kind == "bound" else None)
    with caplog.at_level("WARNING", logger="streamtrack.pipeline"):
        assert tracker.run().frames == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"publish: bound {bound['publish']} (the port was left to the system)",
        f"control: bound {bound['control']} (the port was left to the system)"]
    assert not bound["publish"].endswith(":0")


def test_a_run_that_tracked_nothing_says_its_files_were_not_written(tmp_path, caplog):
    """An earlier run's file at that path would pass for this one's."""
    video = write_video(make_clip(3, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    run = RunConfig(source=str(video), save_jsonl=str(tmp_path / "r.jsonl"), progress=False,
                    save_video=str(tmp_path / "o.mp4"), prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
    tracker = Tracker(run, engine=TrackedIds())
    tracker.stop()  # e.g. a window closed before the first frame
    with caplog.at_level("WARNING", logger="streamtrack.pipeline"):
        assert tracker.run().frames == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"no frame was tracked, so --save-jsonl {tmp_path / 'r.jsonl'} and --save-video "
        f"{tmp_path / 'o.mp4'} were not written"]


def test_ids_a_mask_png_cannot_hold_are_refused_before_they_stop_the_run(tmp_path):
    """--save-masks writes palette PNGs (pixel = object id): id 300 would stop the run at
    its first frame; refused when it is given instead."""
    tracker = tracker_with()
    tracker.config.save_masks = str(tmp_path / "m")
    with pytest.raises(PromptError, match="object 300: --save-masks stores object ids up to 255"):
        add(tracker, 300, box=[1, 2, 30, 40])
    add(tracker, 255, box=[1, 2, 30, 40])
    with pytest.raises(UserError, match="object 256: --save-masks stores object ids up to 255"):
        RunConfig(source="clip.mp4", save_masks=str(tmp_path / "m"),
                  prompts={3: [Prompt.make(256, box=[1, 2, 30, 40])]})


def test_the_checkpoint_is_not_an_output_either(tmp_path, monkeypatch):
    """`--save-jsonl model.pt` by a slip of the tab key would replace a 150-900 MB download."""
    from streamtrack import models

    given = tmp_path / "ckpt.pt"
    given.write_bytes(b"weights")
    for what, kwargs in (("--save-jsonl", {"save_jsonl": str(given)}),
                         ("--save-video", {"save_video": str(tmp_path / "." / "ckpt.pt")})):
        with pytest.raises(UserError, match=f"{what} .* is the model's checkpoint, which it would overwrite"):
            RunConfig(source="clip.mp4", engine=EngineConfig(checkpoint=str(given)), **kwargs)
    monkeypatch.setattr(models, "CHECKPOINT_DIR", tmp_path)  # the default place, not given
    with pytest.raises(UserError, match="is the model's checkpoint"):
        RunConfig(source="clip.mp4", save_jsonl=str(tmp_path / "sam2.1_hiera_tiny.pt"))
    assert given.read_bytes() == b"weights"


def test_the_curve_secret_key_file_is_not_an_output_either(tmp_path):
    from streamtrack.config import Config

    secret = tmp_path / "server.key_secret"
    cfg = Config(curve_secret=str(secret), curve_clients=str(tmp_path), save_video=str(secret))
    with pytest.raises(UserError, match=f"^--save-video {secret} is the CURVE secret key file, which it"):
        RunConfig.from_config(cfg, "clip.mp4", {})


def test_a_file_url_source_is_not_an_output_either(tmp_path):
    video = write_video(make_clip(2, 64, 48, num_objects=1).frames, tmp_path / "my clip.mp4")
    with pytest.raises(UserError, match="is the source video, which it would overwrite"):
        RunConfig(source=video.as_uri(), save_jsonl=str(video))
    RunConfig(source=video.as_uri(), save_jsonl=str(tmp_path / "r.jsonl"))


def _indexed_mp4(path: Path, frames: int) -> Path:
    """An MP4 with its index first (as a download plays while it arrives)."""
    import av

    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {"g": "10", "bf": "0", "preset": "veryfast"}
        for rgb in make_clip(frames, 160, 120, num_objects=1).frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _timed_video(path: Path, times_ms: list[int]) -> Path:
    """Frames at the given times (a variable frame rate where they are uneven)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        for t, rgb in zip(times_ms, make_clip(len(times_ms), 160, 120, num_objects=1).frames, strict=True):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize(("container", "frames", "declared"), [
    ("mp4", 30, r"after \d+ of the 30 frames"),  # the header counts every frame
    ("mkv", 60, r"at \d\.\d s of the 2\.0 s"),  # Matroska/WebM: no count, a duration
    # 2 s at 30 fps, then 4 s at 5 fps: a count from the duration and the rate would be 175
    ("vfr.mkv", 80, r"at \d\.\d s of the 5\.\d s"),
    # A remux that kept its timestamps: 2 s from 5 s on, a duration counted from 0
    ("late.mkv", 60, r"at \d\.\d s of the 7\.0 s"),
])
def test_a_video_file_cut_short_is_reported(tmp_path, caplog, container, frames, declared):
    """An unfinished download or recording decodes up to the cut and ends like a whole file;
    its header still says how long it is."""
    whole = tmp_path / f"whole.{container}"
    if container == "mp4":
        _indexed_mp4(whole, frames)
    elif container == "vfr.mkv":
        _timed_video(whole, [round(i * 1000 / 30) for i in range(60)] + [2000 + i * 200 for i in range(20)])
    elif container == "late.mkv":
        _timed_video(whole, [5000 + round(i * 1000 / 30) for i in range(60)])
    else:
        write_video(make_clip(frames, 160, 120, num_objects=1).frames, whole)
    cut = tmp_path / f"cut.{container}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 6 // 10])
    for video in (whole, cut):
        caplog.clear()
        run = RunConfig(source=str(video), progress=False, prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
        with caplog.at_level("WARNING", logger="streamtrack.pipeline"):
            tracked = Tracker(run, engine=TrackedIds()).run().frames
        messages = [r.getMessage() for r in caplog.records]
        if video == whole:
            assert tracked == frames and messages == []
        else:
            assert 0 < tracked < frames * 0.9 and len(messages) == 1, messages
            assert re.fullmatch(f"video file {re.escape(str(cut))} ended {declared} its header declares: is "
                                "it cut short\\?", messages[0]), messages


def test_a_losslessly_trimmed_mp4_is_not_reported_cut_short(tmp_path, caplog):
    """A stream-copy trim (`ffmpeg -ss 1.5 -c copy`) keeps the frames before the cut that
    its first frame needs, hidden by an edit list: the header counts them, a player does
    not show them, and the file is whole."""
    import av

    encoded = tmp_path / "gop.mp4"
    with av.open(str(encoded), mode="w") as container:  # one keyframe: the cut needs them all
        stream = container.add_stream("libx264", rate=10, options={"g": "40", "keyint_min": "40"})
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for rgb in make_clip(40, 160, 120, num_objects=1).frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    trimmed = tmp_path / "trimmed.mp4"
    with av.open(str(encoded)) as src, av.open(str(trimmed), mode="w") as out:
        video = src.streams.video[0]
        copy = out.add_stream_from_template(video)
        shift = int(1.5 / video.time_base)  # the 15 frames before 1.5 s get negative times
        for packet in src.demux(video):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = copy
            out.mux(packet)
    with av.open(str(trimmed)) as c:
        assert c.streams.video[0].frames == 40 and sum(1 for _ in c.decode(video=0)) == 25
    run = RunConfig(source=str(trimmed), progress=False, prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
    with caplog.at_level("WARNING", logger="streamtrack.pipeline"):
        assert Tracker(run, engine=TrackedIds()).run().frames == 25
    assert [r.getMessage() for r in caplog.records] == []
    # Nor by a restarted tracker, whose frames start at its restart frame (10).
    from streamtrack.capture import CaptureConfig, open_source
    from streamtrack.pipeline import Resume

    with open_source(str(trimmed), CaptureConfig(policy="block")) as cap:
        pts = [f.pts for f in cap]
    resume = Resume(seed=(Prompt(1, mask=np.ones((120, 160), bool)),), frames_done=10, skip_to_frame=10,
                    skip_to_pts=pts[9], seq_start=10, restarts=1)
    with caplog.at_level("WARNING", logger="streamtrack"):
        assert Tracker(replace(run, prompts={}, resume=resume), engine=TrackedIds()).run().frames == 15
    assert [r.getMessage() for r in caplog.records] == []


def test_warnings_during_a_run_print_on_lines_of_their_own(tmp_path, capfd, monkeypatch):
    """Not glued to the progress bar's line (which ends only when the bar closes)."""
    import logging
    import re
    import sys

    import tqdm
    from test_capture import stalling_avi

    from streamtrack.capture import CaptureConfig

    class Shown(tqdm.tqdm):  # on, whatever TQDM_DISABLE said when tqdm was imported
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": False})

    monkeypatch.setattr(tqdm, "tqdm", Shown)

    video = stalling_avi(tmp_path / "damaged.avi")
    console = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(console)
    try:
        run = RunConfig(source=str(video), progress=True, capture=CaptureConfig(read_timeout=0.5),
                        prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
        assert Tracker(run, engine=TrackedIds()).run().frames == 10
    finally:
        logging.getLogger().removeHandler(console)
    err = capfd.readouterr().err
    assert "tracking" in err and "damaged: capture failed: TimeoutError" in err
    assert re.search(r"(^|[\r\n])damaged: capture failed: TimeoutError", err), err


@pytest.mark.parametrize("emit", ["thread", "process"])
def test_the_tracker_reports_a_result_once_it_is_published_and_written(tmp_path, emit):
    """Where a supervisor continues after a crash: a frame reported is in the files."""
    import json

    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    jsonl = tmp_path / "out.jsonl"
    reported = []

    def notify(kind, data):
        if kind == "emitted":
            lines = jsonl.read_text().splitlines()
            reported.append((data["seq"], data["frame_id"], json.loads(lines[-1])["seq"]))

    run = RunConfig(source=str(video), progress=False, save_jsonl=str(jsonl), emit=emit,
                    prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
    Tracker(run, engine=TrackedIds(), notify=notify).run()
    assert [(seq, frame) for seq, frame, _ in reported] == [(i, i) for i in range(6)]
    assert all(last_written >= seq for seq, _, last_written in reported)


@pytest.mark.parametrize(("realtime", "video_time"), [(False, True), (True, False)])
def test_lost_after_counts_a_files_own_time(tmp_path, realtime, video_time):
    """Read at decode speed, a file's objects age by its pts, not by how long tracking took."""
    video = write_video(make_clip(4, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4", fps=10)

    class Clocked(TrackedIds):
        def __init__(self):
            super().__init__()
            self.times = []

        def launch(self, image, prompts, timestamp=None):
            self.times.append(timestamp)
            return super().launch(image, prompts, timestamp)

    engine = Clocked()
    run = RunConfig(source=str(video), progress=False, realtime=realtime,
                    prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
    started = time.monotonic()
    Tracker(run, engine=engine).run()
    if video_time:
        assert engine.times == pytest.approx([0.0, 0.1, 0.2, 0.3])
    else:
        # Paced as live, a pause of this process may drop a frame: the times are the
        # capture clock's, whichever frames were tracked.
        assert len(engine.times) >= 2
        assert all(started <= t <= time.monotonic() for t in engine.times), engine.times


def test_control_prompts_are_reported_queued_then_applied_with_their_frames_seq():
    """What a supervisor keeps to queue them again if the tracker dies before the frame is out."""
    reports = []
    tracker = Tracker(RunConfig(source="clip.mp4"), engine=TrackedIds(),
                      notify=lambda kind, data: reports.append((kind, data)))
    tracker._publisher = StubPublisher()
    tracker.frame_size = (48, 64)
    add(tracker, 2, box=[1, 2, 30, 40])
    add(tracker, 3, points=[[5, 6]])
    tracker._controls.remove_object(3)
    tracker._launch(frame(4), [], tracker._controls.pending)  # as the loop does,
    tracker._controls.pending = []  # which then reports them applied (test below)
    tracker._controls.reset()  # nothing queued: nothing to say
    add(tracker, 4, box=[1, 2, 30, 40])
    tracker._controls.reset()
    said = [(k, d["prompt"].obj_id if "prompt" in d else d.get("obj_id")) for k, d in reports]
    assert said == [("queued", 2), ("queued", 3), ("unqueued", 3), ("queued", 4), ("unqueued", None)]


def test_a_restarted_tracker_queues_the_prompts_its_predecessor_had_not_finished(tmp_path):
    from streamtrack.pipeline import Resume

    video = write_video(make_clip(3, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    carried = (Prompt.make(7, box=[1, 2, 30, 40]),)
    reports = []
    engine = TrackedIds([1])
    run = RunConfig(source=str(video), progress=False,
                    resume=Resume(seed=(Prompt(1, mask=np.ones((48, 64), bool)),), queued=carried))
    tracker = Tracker(run, engine=engine, notify=lambda kind, data: reports.append((kind, data)))
    tracker.run()
    assert [p.obj_id for p in engine.launched[0]] == [1, 7]  # the seed, then the carried prompt
    assert [(k, d) for k, d in reports if k == "applied"] == [("applied", {"seq": 0, "obj_ids": [7]})]
    assert [d["prompt"].obj_id for k, d in reports if k == "queued"] == [7]  # kept until its frame is out
    # Applied, it is an object like any other: removing it unqueues nothing.
    assert tracker._controls.remove_object(7) == {"objects": [1]}
    assert [k for k, _ in reports if k == "unqueued"] == []


@contextlib.contextmanager
def live_tracker(tmp_path, engine, **options):
    """A tracker on a looping real-time clip, run on a thread until the block ends:
    (its reports to a supervisor as (kind, monotonic time), its bound endpoints)."""
    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    run = RunConfig(source=str(video), realtime=True, loop=True, control="tcp://127.0.0.1:0",
                    progress=False, prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]}, **options)
    with tracker_on_a_thread(run, engine) as (reports, bound):
        yield reports, bound


@contextlib.contextmanager
def tracker_on_a_thread(run: RunConfig, engine):
    """``run`` tracked on a thread until the block ends, from once it has bound its
    endpoints: (its reports to a supervisor as (kind, monotonic time), its bound endpoints)."""
    reports: list[tuple[str, float]] = []
    bound: dict = {}

    def notify(kind, data):
        reports.append((kind, time.monotonic()))
        if kind == "bound":
            bound.update(data)

    tracker = Tracker(run, engine=engine, notify=notify)
    thread = threading.Thread(target=tracker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not bound and time.monotonic() < deadline:
            time.sleep(0.01)
        yield reports, bound
    finally:
        tracker.stop()
        thread.join(30)


def test_the_loop_reports_it_is_alive_while_paused_and_not_while_a_step_never_returns(tmp_path):
    """A supervisor kills a tracker that stops reporting; paused or idle is not hung, a
    step that never returns is."""
    from streamtrack.pipeline import ALIVE_EVERY

    step_returns = threading.Event()
    stuck = threading.Event()
    resumed = threading.Event()  # stuck only after the pause: a stuck loop cannot answer it

    class StuckOnFrame3(TrackedIds):
        def launch(self, image, prompts, timestamp=None):
            if len(self.launched) >= 3 and resumed.is_set() and not step_returns.is_set():
                stuck.set()
                assert step_returns.wait(30)
            return super().launch(image, prompts, timestamp)

    try:
        with live_tracker(tmp_path, StuckOnFrame3()) as (reports, bound):
            def alive_between(t0, t1):
                return sum(kind == "alive" and t0 <= t < t1 for kind, t in reports)

            with ControlClient(bound["control"], timeout=5) as client:
                client.pause()
                paused = time.monotonic()
                time.sleep(4.5 * ALIVE_EVERY)
                assert alive_between(paused, time.monotonic()) >= 3
                resumed.set()
                client.resume()
            assert stuck.wait(20)
            since = time.monotonic()
            time.sleep(2.5 * ALIVE_EVERY)
            assert alive_between(since, time.monotonic()) == 0
            step_returns.set()
            time.sleep(1.5 * ALIVE_EVERY)
            assert alive_between(since, time.monotonic()) >= 1
    finally:
        step_returns.set()


def test_stats_keep_coming_every_second_while_paused_with_a_falling_rate(tmp_path):
    """stats/<stream> is a heartbeat: a subscriber tells a paused tracker (or one whose
    source is down) from a dead one."""
    from streamtrack.subscriber import Subscriber

    with live_tracker(tmp_path, TrackedIds(), publish="tcp://127.0.0.1:0") as (_, bound), \
            Subscriber(bound["publish"], topics=["masks/", "stats/"]) as sub, \
            ControlClient(bound["control"], timeout=5) as client:
        while (msg := sub.recv(timeout=10)) is not None and msg.kind != "masks":
            pass
        client.pause()
        paused = time.monotonic()
        got = []
        while time.monotonic() - paused < 3.6:
            msg = sub.recv(timeout=0.2)
            if msg is not None and time.monotonic() - paused > 0.5:  # frames in hand are out
                got.append(msg)
        client.resume()
    assert {m.kind for m in got} == {"stats"}
    assert len(got) >= 2
    assert all(m.stats.source_state == "streaming" and m.stats.paused is True for m in got)
    assert got[-1].stats.fps < got[0].stats.fps or got[-1].stats.fps == 0.0  # 0 after 2 s without a frame


def test_stats_say_why_the_source_is_down_to_a_subscriber_that_missed_the_event():
    """A subscriber that joins while the camera is down never got the source_state event
    with its reason (it went out before anyone could be connected): stats carry it."""
    from conftest import free_port

    from streamtrack.subscriber import Subscriber

    run = RunConfig(source=f"rtsp://127.0.0.1:{free_port()}/cam", publish="tcp://127.0.0.1:0",
                    progress=False)
    with tracker_on_a_thread(run, TrackedIds()) as (_, bound), \
            Subscriber(bound["publish"], topics=["stats/"]) as sub:
        got = [m.stats for _ in range(3) if (m := sub.recv(timeout=5)) is not None]
    down = [s for s in got if s.source_state == "reconnecting"]
    assert down, got
    assert all(s.source_error and "refused" in s.source_error.lower() for s in down), down


def test_object_state_events_go_out_after_the_result_that_shows_the_change(tmp_path, monkeypatch):
    """A subscriber never gets "removed" before a result that still has the object."""

    class SeesObjectOneOnThreeFrames(TrackedIds):
        def finish(self, index):
            objects = (object_one(visible=index != 1),) if index < 3 else ()
            return FrameOutput(index, 64, 48, objects, time.time(), time.time())

    calls = record_emitted(monkeypatch)
    video = write_video(make_clip(5, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    run = RunConfig(source=str(video), progress=False, save_jsonl=str(tmp_path / "r.jsonl"))
    tracker = Tracker(run, engine=SeesObjectOneOnThreeFrames(ids=[1]))
    tracker.run()
    states = [(c[0], c[1]["obj_id"], c[1]["old"], c[1]["new"]) if c[0] == "object_state" else c[:2]
              for c in calls if c[0] != "tracker_state"]
    assert states == [
        ("result", 0), ("object_state", 1, None, "visible"),
        ("result", 1), ("object_state", 1, "visible", "occluded"),
        ("result", 2), ("object_state", 1, "occluded", "visible"),
        ("result", 3), ("object_state", 1, "visible", "removed"),
        ("result", 4),
    ], calls


def test_a_prompts_file_frame_is_the_source_frame_id_even_when_frames_are_dropped(tmp_path, monkeypatch):
    """A live source (or --realtime) drops frames: a prompt for frame 3 goes on the first
    frame processed from frame_id 3 on, not on the fourth frame processed."""
    import streamtrack.pipeline as pipeline

    opened = pipeline.open_source

    def every_other_frame(*args, **kwargs):
        capture = opened(*args, **kwargs)
        read = capture.read

        def odd_frames_dropped(timeout=None):
            frame = read(timeout)
            while frame is not None and frame.frame_id % 2:
                frame = read(timeout)
            return frame

        capture.read = odd_frames_dropped
        return capture

    monkeypatch.setattr(pipeline, "open_source", every_other_frame)
    video = write_video(make_clip(12, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    box = [1, 2, 30, 40]
    prompts = {0: [Prompt.make(1, box=box)], 3: [Prompt.make(2, box=box)], 4: [Prompt.make(3, box=box)],
               9: [Prompt.make(4, box=box)], 30: [Prompt.make(5, box=box)]}
    run = RunConfig(source=str(video), progress=False, save_jsonl=str(tmp_path / "r.jsonl"), prompts=prompts)
    tracker = Tracker(run, engine=TrackedIds())
    tracker.run()
    frame_ids = [json.loads(line)["frame_id"] for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert frame_ids == [0, 2, 4, 6, 8, 10]
    launched = {f: sorted(p.obj_id for p in ps)
                for f, ps in zip(frame_ids, tracker.engine.launched, strict=True)}
    assert launched == {0: [1], 2: [], 4: [2, 3], 6: [], 8: [], 10: [4]}
    assert tracker._prompt_frames == [30]  # reported at the end as never applied


def test_the_frame_held_while_paused_is_asked_for_again_if_it_was_not_there_yet(tmp_path, monkeypatch):
    """The frame after the paused one is held for the prompts sent while paused; a first
    read that comes back empty (a busy machine) must not leave the resume to take whatever
    a live source has by then."""
    import streamtrack.pipeline as pipeline

    opened = pipeline.open_source
    held: list[int] = []
    tracker: Tracker

    def first_paused_read_empty(*args, **kwargs):
        capture = opened(*args, **kwargs)
        read = capture.read
        empty_once = [True]

        def flaky_read(timeout=None):
            if tracker._controls.paused:
                if empty_once.pop() if empty_once else False:
                    return None  # as a read that timed out
                frame = read(timeout)
                held.append(frame.frame_id)
                tracker._controls.resume()
                return frame
            return read(timeout)

        capture.read = flaky_read
        return capture

    class PausesAfterFrameTwo(TrackedIds):
        def finish(self, index):
            if index == 2:
                tracker._controls.pause()
                timer = threading.Timer(3.0, tracker._controls.resume)  # never read again: no hang
                timer.daemon = True
                timer.start()
            return super().finish(index)

    monkeypatch.setattr(pipeline, "open_source", first_paused_read_empty)
    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    run = RunConfig(source=str(video), progress=False, save_jsonl=str(tmp_path / "r.jsonl"),
                    prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
    tracker = Tracker(run, engine=PausesAfterFrameTwo())
    tracker.run()
    assert held == [3]


def test_a_restart_past_the_last_frame_still_says_which_prompts_were_never_applied(tmp_path, caplog):
    """The tracker died after writing the file's last frame: its successor only skips
    frames, and the prompts for frames past the end are still reported."""
    import logging

    from streamtrack.pipeline import Resume

    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    resume = Resume(frames_done=6, skip_to_frame=6, seq_start=6, restarts=1)
    box = [1, 2, 30, 40]
    run = RunConfig(source=str(video), progress=False, save_jsonl=str(tmp_path / "r.jsonl"), resume=resume,
                    prompts={0: [Prompt.make(1, box=box)], 50: [Prompt.make(2, box=box)]})
    with caplog.at_level(logging.WARNING, logger="streamtrack"):
        Tracker(run, engine=TrackedIds()).run()
    assert "prompts for frame 50 never applied: the source ended after 6 frames" in caplog.text


def test_a_restarted_tracker_continues_frame_ids_drops_and_object_states_of_a_live_source(
        tmp_path, monkeypatch):
    from streamtrack.pipeline import Resume

    class SeesObjectOne(TrackedIds):
        def finish(self, index):
            return FrameOutput(index, 64, 48, (object_one(),), time.time(), time.time())

    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    seed = np.zeros((48, 64), bool)
    seed[5:20, 5:30] = True
    resume = Resume(seed=(Prompt(obj_id=1, mask=seed),), frames_done=40, seq_start=40, restarts=1,
                    frame_id_start=11450, dropped_before={"queue_full": 7},
                    object_states={1: "visible"})
    # Looping: a pause of this process may drop frames, and the clip must not end first.
    run = RunConfig(source=str(video), realtime=True, loop=True, max_frames=43, progress=False,
                    save_jsonl=str(tmp_path / "r.jsonl"), resume=resume)
    calls = record_emitted(monkeypatch)
    tracker = Tracker(run, engine=SeesObjectOne())
    tracker.run()
    from streamtrack.protocol import FrameResult

    results = [FrameResult.from_json(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(results) == 3 and results[0].frame_id in range(11450, 11460)  # not from 0
    assert all(r.frame_id >= 11450 and r.dropped["queue_full"] >= 7 for r in results)
    assert [c for c in calls if c[0] == "result"]  # what the emitter got is recorded...
    assert [c for c in calls if c[0] == "object_state"] == []  # ...and still visible: no change


def test_a_looping_file_has_no_progress_total(tmp_path, monkeypatch):
    """It never ends: a bar at 58/90 after 1,700 frames would say otherwise."""
    import tqdm

    totals = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            totals.append(kwargs.get("total"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    video = write_video(make_clip(6, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    for loop, max_frames in ((True, None), (True, 9), (False, None)):
        tracker = Tracker(RunConfig(source=str(video), loop=loop, max_frames=max_frames, progress=True,
                                    prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]}),
                          engine=TrackedIds())
        if loop and max_frames is None:  # endless: stopped, as by Ctrl-C
            threading.Timer(1.0, tracker.stop).start()
        tracker.run()
    assert totals == [None, 9, 6]


@pytest.mark.parametrize("emit", ["thread", "process"])
def test_a_one_frame_overlay_video_declares_the_source_files_rate(tmp_path, emit):
    """Two frames' pts give the video its rate; with one (--max-frames 1) the source file's
    own 10 fps is declared, not the writer's 30."""
    video = write_video(make_clip(4, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4", fps=10)
    run = RunConfig(source=str(video), progress=False, max_frames=1, emit=emit,
                    save_video=str(tmp_path / "one.mp4"), prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
    Tracker(run, engine=TrackedIds()).run()
    with av.open(str(tmp_path / "one.mp4")) as c:
        assert c.streams.video[0].average_rate == 10
        assert sum(1 for _ in c.decode(video=0)) == 1


def test_a_paced_file_restarted_goes_on_after_its_last_frame_written(tmp_path, caplog):
    """`run --realtime FILE` under a supervisor: the restarted tracker's file went back to
    its first frame, numbered after the last one published (source frame 0 as frame 8).
    Played to its end, it is a whole file, not one cut short."""
    from streamtrack.capture import CaptureConfig
    from streamtrack.pipeline import Resume
    from streamtrack.protocol import FrameResult

    video = write_video(make_clip(12, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4", fps=30)
    results = tmp_path / "r.jsonl"
    run = RunConfig(source=str(video), realtime=True, progress=False, save_jsonl=str(results),
                    capture=CaptureConfig(realtime=True, policy="block"),
                    resume=Resume(seed=(Prompt(1, mask=np.ones((48, 64), bool)),), skip_to_frame=8,
                                  frame_id_start=9, restarts=1))
    with caplog.at_level("WARNING", logger="streamtrack"):
        assert Tracker(run, engine=TrackedIds()).run().frames == 4
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    out = [FrameResult.from_json(line) for line in results.read_text().splitlines()]
    assert [(r.frame_id, round(r.pts * 30)) for r in out] == [(i, i) for i in range(8, 12)]


@pytest.mark.parametrize("realtime", [False, True])
def test_a_restarted_tracker_seeks_its_file_to_the_last_frame_reported_written(tmp_path, frames_decoded,
                                                                               realtime):
    """The tracker reports each result's pts with it; a restart at that frame seeks the
    file there (an hour into a recording, decoding up to it took minutes) and goes on
    with the same frames, ids and pts."""
    from streamtrack.capture import CaptureConfig
    from streamtrack.pipeline import Resume
    from streamtrack.protocol import FrameResult

    frames = 40
    video = write_video(make_clip(frames, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4", gop=10)
    emitted = []
    first = tmp_path / "first.jsonl"
    run = RunConfig(source=str(video), progress=False, save_jsonl=str(first), realtime=realtime,
                    capture=CaptureConfig(realtime=realtime, policy="block"),
                    prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]})
    Tracker(run, engine=TrackedIds(),
            notify=lambda kind, data: emitted.append(data) if kind == "emitted" else None).run()
    written = {r.frame_id: r.pts for r in map(FrameResult.from_json, first.read_text().splitlines())}
    assert [(d["frame_id"], d["pts"]) for d in emitted] == list(written.items())

    frames_decoded[0] = 0  # from here on
    at = 33  # the last frame written: from the key frame at 30 (or 20), not from 0
    again = tmp_path / "again.jsonl"
    resume = Resume(seed=(Prompt(1, mask=np.ones((48, 64), bool)),), frames_done=at + 1, skip_to_frame=at + 1,
                    skip_to_pts=emitted[at]["pts"], seq_start=at + 1, restarts=1)
    Tracker(replace(run, save_jsonl=str(again), prompts={}, resume=resume), engine=TrackedIds()).run()
    out = [FrameResult.from_json(line) for line in again.read_text().splitlines()]
    assert [(r.frame_id, r.pts) for r in out] == [(i, written[i]) for i in range(at + 1, frames)]
    assert frames_decoded[0] <= frames - 20


def test_a_tracker_says_which_frames_go_to_its_video_part_before_they_do(tmp_path):
    """What a restart needs to tell which frames a dead tracker's video part holds: each
    frame handed to the video, said before it is written (not those an earlier part has)."""
    from streamtrack.pipeline import Resume

    video = write_video(make_clip(5, 64, 48, num_objects=1).frames, tmp_path / "clip.mp4")
    said: list[tuple[str, int | None]] = []
    run = RunConfig(source=str(video), progress=False, save_video=str(tmp_path / "o.mp4"),
                    prompts={0: [Prompt.make(1, box=[1, 2, 30, 40])]}, resume=Resume(video_through=1))
    Tracker(run, engine=TrackedIds(), notify=lambda kind, data: said.append((kind, data.get("frame_id")))
            ).run()
    assert [f for kind, f in said if kind == "video"] == [2, 3, 4]
    for frame_id in (2, 3):  # reported written once the next is
        assert said.index(("video", frame_id)) < said.index(("emitted", frame_id))
