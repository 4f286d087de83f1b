"""Argument types the benchmark scripts share: a bad count, duration, size or device is
argparse's error line (exit 2) before anything runs, not a traceback half-way through."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from streamtrack.errors import UserError


def count(minimum: int = 1) -> Callable[[str], int]:
    """An integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {minimum}")
        return value

    return parse


def seconds(minimum: float = 0.0, *, above: bool = False) -> Callable[[str], float]:
    """A finite number of at least ``minimum`` (more than it, with ``above``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None
        if not math.isfinite(value) or value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number "
                                             f"{'more than' if above else 'at least'} {minimum:g}")
        return value

    return parse


def frame_size(text: str) -> str:
    """``WxH``, as given (the scripts key their results by it)."""
    from streamtrack.bench_stream import parse_frame_size

    try:
        parse_frame_size(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--frame-size ")) from None
    return text.lower()


def image_size(text: str) -> int:
    """A model input size the model builder takes (a multiple of 32, 64 to 2048)."""
    from streamtrack.models import check_image_size

    value = count(1)(text)
    try:
        check_image_size(value)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def device(text: str) -> str:
    """auto, cpu, cuda[:N] or mps, and one this machine has."""
    from streamtrack.models import check_device_name, resolve_device

    try:
        resolve_device(check_device_name(text))
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text
