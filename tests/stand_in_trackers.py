"""Tracker process entry points that misbehave on purpose, for the supervisor's tests.

A module of their own, light to import: a spawned child imports the module its target
lives in.
"""

from __future__ import annotations

import os


def loads_then_dies(reports, lifeline, log_level) -> None:
    """Says its model is loaded ("running"), then dies before its first result."""
    reports.send(("running", {"pid": os.getpid()}))
    os._exit(3)


def stuck_in_a_frame(reports, lifeline, log_level) -> None:
    """Runs, then spends a minute on one frame, deaf to the stop signals (SIGTERM)."""
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reports.send(("running", {"pid": os.getpid()}))
    time.sleep(60)
    os._exit(0)


def publishes_then_stuck_in_a_frame(reports, lifeline, log_level) -> None:
    """Publishes results 0.25 s after their capture for 2 s, then spends a minute on one
    frame, deaf to the stop signals (SIGTERM)."""
    import signal
    import time

    from streamtrack.protocol import FrameResult, now
    from streamtrack.publisher import Publisher

    config = lifeline.recv()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    publisher = Publisher(config.publish, stream=config.stream)
    reports.send(("bound", {"publish": config.publish, "control": None}))
    reports.send(("running", {"pid": os.getpid()}))
    for i in range(40):  # for 2 s: the supervisor's subscriber joins meanwhile
        publisher.publish_result(FrameResult(stream=config.stream, seq=i, frame_id=i, pts=None, width=4,
                                             height=3, t={"capture": now() - 0.25}))
        time.sleep(0.05)
    time.sleep(60)
    os._exit(0)
