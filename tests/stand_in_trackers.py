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
