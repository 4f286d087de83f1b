"""Consume the mask stream in another process: centroid and area per object.

    streamtrack run demos/sample.mp4 --prompts demos/sample_prompts.json \
        --publish tcp://127.0.0.1:5555 &
    python demos/centroids.py tcp://127.0.0.1:5555

Prints one line per received frame; masks are decoded only here, on demand.
"""

from __future__ import annotations

import consumer  # demos/consumer.py: the command line and its ending, shared with region_monitor
from consumer import centroid

__all__ = ["centroid", "describe"]


def describe(msg) -> str:
    """One line for a message: each object's state, area and mask centroid."""
    parts = []
    for obj in msg.result.objects:
        c = centroid(msg.mask(obj.obj_id))  # None: an empty mask, or one sent without RLE
        where = f"({c[0]:.0f},{c[1]:.0f})" if c else "-"
        parts.append(f"#{obj.obj_id} {obj.state} area={obj.area} centroid={where}")
    return f"frame {msg.result.frame_id}: " + "; ".join(parts or ["no objects"])


def main() -> None:
    parser = consumer.parser(__doc__)
    args = consumer.parse_args(parser)

    def consume() -> None:
        for msg in consumer.messages(args):
            consumer.say(describe(msg))

    consumer.run(parser, consume)


if __name__ == "__main__":
    main()
