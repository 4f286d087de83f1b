"""What the consumer demos share: their command line (an endpoint, ``--count``), the
messages, and ending as a command-line tool should.

A bad endpoint or a full disk is one line on stderr (exit 2 and 1); a reader of the output
that goes away (``| head``) ends the consumer quietly (exit 0); Ctrl-C exits 130; and while
nothing comes, a line on stderr says so once, as ``streamtrack subscribe`` does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np

from streamtrack.errors import UserError, discard_output, error_reason, reader_gone
from streamtrack.protocol import cross_process_endpoint
from streamtrack.subscriber import Message, Subscriber

SILENCE_HINT_S = 5.0


def centroid(mask: np.ndarray | None) -> tuple[float, float] | None:
    """(x, y) of the mask's pixels; None for an empty mask or none at all (an object sent
    without RLE)."""
    if mask is None:
        return None
    ys, xs = np.nonzero(mask)
    return (float(xs.mean()), float(ys.mean())) if len(xs) else None


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555")
    p.add_argument("--count", type=int, default=0, help="stop after N messages (0 = forever)")
    return p


def parse_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if args.count < 0:
        p.error(f"argument --count: '{args.count}': a number of messages, 0 or more")
    return args


def messages(args: argparse.Namespace) -> Iterator[Message]:
    """The stream's messages (the newest of each topic when the consumer falls behind),
    up to ``--count``."""
    seen = 0
    with Subscriber(cross_process_endpoint(args.endpoint)) as sub:
        last, hinted = time.monotonic(), False
        while not args.count or seen < args.count:
            msg = sub.recv(timeout=0.25)
            if msg is None:
                if sub.closed:  # its receive thread ended: recv() would return None at once, for ever
                    return
                if not hinted and time.monotonic() - last >= SILENCE_HINT_S:
                    hinted = True  # waiting is right, but a silent terminal looks like a hang
                    print(f"nothing from {args.endpoint} in {SILENCE_HINT_S:g} s, still waiting: is a "
                          "tracker publishing there?", file=sys.stderr, flush=True)
                continue
            last, hinted = time.monotonic(), False
            yield msg
            seen += 1


class OutputFailed(Exception):
    """Writing to stdout failed: its reader went away, or the disk is full."""


def say(line: str) -> None:
    """Print ``line`` at once (a consumer's output is read live)."""
    try:
        print(line, flush=True)
    except OSError as e:
        raise OutputFailed(e) from e


def run(p: argparse.ArgumentParser, consume: Callable[[], None]) -> None:
    """Run ``consume`` and end as the module docstring says."""
    try:
        consume()
    except UserError as e:  # a bad endpoint: one line, as the CLI says it
        p.exit(2, f"{p.prog}: error: {e}\n")
    except KeyboardInterrupt:
        p.exit(130)
    except OutputFailed as e:
        discard_output(sys.stdout)  # what is still buffered would fail again at exit
        cause = e.__cause__
        if cause is not None and reader_gone(cause):
            p.exit(0)  # `| head` has what it wanted
        p.exit(1, f"{p.prog}: error: cannot write the output: {error_reason(cause or e)}\n")
