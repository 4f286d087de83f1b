"""The tracker confirms control prompts with ``prompt_applied`` status events (no model needed)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from streamtrack.engine import Prompt
from streamtrack.errors import PromptError
from streamtrack.pipeline import RunConfig, Tracker


class StubEngine:
    """Records what it is asked to do; refuses prompts for object 99, as a bad prompt."""

    def __init__(self):
        self.calls: list[list[Prompt]] = []

    def launch(self, image, prompts, timestamp=None):
        if any(p.obj_id == 99 for p in prompts):
            raise PromptError("point (900, 10) is outside the 64x48 frame")
        self.calls.append(list(prompts))
        return SimpleNamespace(objects=[])


class StubPublisher:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def publish_status(self, kind, **data):
        self.events.append((kind, data))


def make_tracker():
    tracker = Tracker(RunConfig(source="clip.mp4"), engine=StubEngine())
    tracker._publisher = StubPublisher()
    return tracker


def frame(frame_id):
    return SimpleNamespace(image=np.zeros((48, 64, 3), np.uint8), capture_monotonic=1.0, frame_id=frame_id)


def test_applied_control_prompts_are_reported_with_their_frame_and_coordinates():
    tracker = make_tracker()
    from_file = Prompt.make(1, box=[1, 2, 30, 40])
    requested = [Prompt.make(2, points=[[10.5, 20.25], [3, 4]], labels=[1, 0]),
                 Prompt.make(3, box=[5, 6, 50, 45]),
                 Prompt(4, mask=np.ones((48, 64), bool))]
    tracker._launch(frame(17), [from_file], requested)
    assert [p.obj_id for p in tracker.engine.calls[0]] == [1, 2, 3, 4]
    events = tracker._publisher.events
    # Only control prompts: a prompts-file entry is the user's own, known in advance.
    assert [k for k, _ in events] == ["prompt_applied"] * 3
    assert events[0][1] == {"obj_id": 2, "frame_id": 17, "points": ((10.5, 20.25), (3.0, 4.0)),
                            "labels": (1, 0), "box": None, "mask": False}
    assert events[1][1] == {"obj_id": 3, "frame_id": 17, "points": None, "labels": None,
                            "box": (5.0, 6.0, 50.0, 45.0), "mask": False}
    assert events[2][1]["obj_id"] == 4 and events[2][1]["mask"] is True


def test_dropped_prompts_are_reported_as_errors_not_applied():
    tracker = make_tracker()
    tracker._launch(frame(3), [Prompt.make(1, box=[1, 2, 30, 40])], [Prompt.make(99, points=[[900, 10]])])
    assert [p.obj_id for p in tracker.engine.calls[0]] == [1]  # the frame still runs, without it
    (kind, data), = tracker._publisher.events
    assert kind == "error" and "prompt dropped" in data["message"]


def test_no_control_prompt_no_event():
    tracker = make_tracker()
    tracker._launch(frame(0), [Prompt.make(1, box=[1, 2, 30, 40])], [])
    assert tracker._publisher.events == []
