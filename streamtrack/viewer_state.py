"""What the live viewer's HUD and banner show, as pure logic: latency windows, rates,
the source's state by the newest timestamp, the banner, and preview frames paired with
the results of the same frame.  Tests drive it without a display."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from streamtrack.protocol import FrameHeader, FrameResult

NOT_PUBLISHING_AFTER = 2.0  # seconds without any message before the banner says so
# Source states that deserve a warning banner (see capture.SourceState).
WARN_STATES = frozenset({"connecting", "reconnecting", "stale", "failed"})
DONE_STATES = frozenset({"ended", "stopped"})

# BGR colours of the banner (OpenCV draws in BGR; the overlay palette is RGB).
BANNER_WARN_BGR = (0, 140, 255)  # orange: source reconnecting / stale
BANNER_DEAD_BGR = (40, 40, 220)  # red: tracker not publishing
BANNER_DONE_BGR = (110, 110, 110)  # grey: source ended


# ------------------------------------------------------------------------- HUD stats


class SlidingWindow:
    """The last ``size`` samples (seconds) with their percentiles."""

    def __init__(self, size: int = 120) -> None:
        if size < 1:
            raise ValueError("window size must be >= 1")
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        if math.isfinite(value):
            self._samples.append(float(value))

    def __len__(self) -> int:
        return len(self._samples)

    def percentiles(self, *qs: float) -> tuple[float, ...] | None:
        if not self._samples:
            return None
        return tuple(float(v) for v in np.percentile(np.fromiter(self._samples, float), qs))

    def p50_p95(self) -> tuple[float, float] | None:
        p = self.percentiles(50, 95)
        return None if p is None else (p[0], p[1])


class RateMeter:
    """Events per second over the ticks of the last ``horizon`` seconds.

    Time-bounded, so the rate falls to 0 when events stop instead of freezing at the
    last value. The last two ticks are kept however old, so a stream slower than the
    horizon (a CPU tracker at 0.5 fps) still shows its rate until it stops for longer
    than both the horizon and twice its last interval.
    """

    def __init__(self, horizon: float = 2.0, size: int = 240) -> None:
        self.horizon = horizon
        self._ticks: deque[float] = deque(maxlen=size)

    def tick(self, t: float) -> None:
        self._ticks.append(t)

    def rate(self, at: float) -> float:
        while len(self._ticks) > 2 and self._ticks[0] < at - self.horizon:
            self._ticks.popleft()
        if len(self._ticks) < 2:
            return 0.0
        if at - self._ticks[-1] > max(self.horizon, 2 * (self._ticks[-1] - self._ticks[-2])):
            return 0.0  # stopped
        span = self._ticks[-1] - self._ticks[0]
        return (len(self._ticks) - 1) / span if span > 0 else 0.0


class SourceStateTracker:
    """The source state by the newest timestamp, from results and status events.

    Status events are handed out before results by the subscriber, so arrival order
    would let an older ``streaming`` result overwrite a newer ``reconnecting`` event.
    """

    def __init__(self) -> None:
        self.state: str | None = None
        self.reason: str | None = None  # why it is down (a source_state event's, or stats')
        self.time = -math.inf

    def update(self, state: str, at: float, reason: str | None = None) -> None:
        """``reason``: None from a result (which carries none): the reason already known
        stays while the state does."""
        if at >= self.time:
            if state != self.state or reason is not None:
                self.reason = reason if state in WARN_STATES else None
            self.state, self.time = state, at


def banner_for(source_state: str | None, silent_for: float, ever_received: bool,
               limit: float = NOT_PUBLISHING_AFTER, *,
               paused: bool = False,
               no_results_for: float | None = None,
               tracker_stopped: bool = False,
               waiting_for_prompt: bool = False) -> tuple[str, tuple[int, int, int]] | None:
    """The banner text and BGR colour, or None when all is well.  ``silent_for``: seconds
    since any message; ``no_results_for``: since the last result (default the same);
    ``tracker_stopped``: the tracker said it stopped (and has not said it runs again);
    ``waiting_for_prompt``: its stats say it holds a file's first frame for a prompt.

    A source that is down explains the silence (a tracker without frames publishes
    no results), so it wins over "not publishing"; so does a tracker that said it
    stopped, or a source that ended: that silence is the end, not a failure.
    """
    frameless = silent_for if no_results_for is None else no_results_for
    if tracker_stopped:
        ended = f", source {source_state}" if source_state in DONE_STATES else ""
        return f"TRACKER STOPPED{ended}", BANNER_DONE_BGR
    if source_state in WARN_STATES:
        quiet = f" (no frames for {frameless:.0f} s)" if frameless > limit else ""
        return f"SOURCE {source_state.upper()}{quiet}", BANNER_WARN_BGR
    if source_state in DONE_STATES:
        return f"SOURCE {source_state.upper()}", BANNER_DONE_BGR
    if silent_for > limit:
        # A paused tracker still sends stats every second: silence is not the pause.
        what = "TRACKER NOT PUBLISHING" if ever_received else "WAITING FOR TRACKER"
        return f"{what}: no message for {silent_for:.0f} s", BANNER_DEAD_BGR
    if paused and ever_received:
        return "TRACKER PAUSED (space resumes)", BANNER_DONE_BGR
    if waiting_for_prompt and ever_received:
        return "WAITING FOR A PROMPT: drag a box around an object, or click it", BANNER_DONE_BGR
    return None


# ------------------------------------------------------------------- frame pairing


@dataclass(frozen=True)
class FrameItem:
    """A received preview frame (decoded lazily: only the one drawn is decoded)."""

    header: FrameHeader
    jpeg: bytes

    @property
    def frame_id(self) -> int:
        return self.header.frame_id


@dataclass(frozen=True)
class Pairing:
    frame: FrameItem | None  # None: the tracker sends no frames, draw masks on a blank canvas
    result: FrameResult | None  # None: frames but no result yet
    exact: bool  # result.frame_id == frame.frame_id


class FramePairer:
    """Pairs preview frames with the result of the same ``frame_id``.

    Keeps the last ``keep`` frames and results. :meth:`select` gives the newest frame
    that has a result; when results lag further behind than that, the newest frame
    with the newest masks (marked not exact).
    """

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self.frames: OrderedDict[int, FrameItem] = OrderedDict()
        self.results: OrderedDict[int, FrameResult] = OrderedDict()

    @staticmethod
    def _put(store: OrderedDict, other: OrderedDict, key: int, value: object, keep: int) -> None:
        if store and key < next(reversed(store)):
            # frame_id went backwards: the tracker restarted and counts from 0 again;
            # what we hold of the old run would pair with the wrong frames, its own
            # frame_id too.
            store.clear()
            for k in [k for k in other if k >= key]:
                del other[k]
        store[key] = value
        store.move_to_end(key)
        while len(store) > keep:
            store.popitem(last=False)

    def add_frame(self, item: FrameItem) -> None:
        self._put(self.frames, self.results, item.frame_id, item, self.keep)

    def add_result(self, result: FrameResult) -> None:
        self._put(self.results, self.frames, result.frame_id, result, self.keep)

    @property
    def latest_result(self) -> FrameResult | None:
        return next(reversed(self.results.values()), None)

    def select(self) -> Pairing | None:
        latest = self.latest_result
        for fid in reversed(self.frames):
            if fid in self.results:
                return Pairing(self.frames[fid], self.results[fid], True)
        if self.frames:
            return Pairing(next(reversed(self.frames.values())), latest, False)
        if latest is not None:
            return Pairing(None, latest, False)
        return None
