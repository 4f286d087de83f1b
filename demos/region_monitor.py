"""Watch a tracked object: raise an event when it leaves a region or is lost.

Typical use with an RTSP camera:

    streamtrack run rtsp://camera/stream --config rtsp --box 100,80,220,200 &
    python demos/region_monitor.py tcp://127.0.0.1:5555 --region 0,0,320,240

Events are printed as JSON lines (pipe them to anything). An object "leaves"
when its mask's centroid goes outside the region; "lost" comes from the
tracker's object state (absent longer than its ``lost_after``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping

import consumer  # demos/consumer.py: the command line and its ending, shared with centroids
from consumer import centroid


def inside(region, point: tuple[float, float] | None) -> bool:
    """Whether ``point`` (a mask's centroid; None for no mask) is in ``region``."""
    if point is None:
        return False
    return region[0] <= point[0] <= region[2] and region[1] <= point[1] <= region[3]


def events_for(result, centroids: Mapping[int, tuple[float, float] | None], region,
               last: dict[int, str]) -> list[dict]:
    """Compare each object's situation with the previous message's; return the changes.
    ``centroids``: each object's mask centroid (not its box's centre, which one stray
    pixel far away moves)."""
    out = []
    for obj in result.objects:
        where = "inside" if inside(region, centroids.get(obj.obj_id)) else "outside"
        now = "lost" if obj.state == "lost" else where
        before = last.get(obj.obj_id)
        if before is not None and now != before:
            kind = {"outside": "left_region", "inside": "entered_region", "lost": "lost"}[now]
            out.append({"event": kind, "obj_id": obj.obj_id, "frame_id": result.frame_id,
                        "stream": result.stream, "time": time.time()})
        last[obj.obj_id] = now
    return out


def parse_region(text: str) -> list[float]:
    try:
        region = [float(v) for v in text.split(",")]
    except ValueError:
        region = []
    if len(region) != 4 or not all(math.isfinite(v) for v in region):
        raise argparse.ArgumentTypeError(f"{text!r}: give x0,y0,x1,y1 (four numbers)")
    if not (region[0] < region[2] and region[1] < region[3]):  # every object would be "outside"
        raise argparse.ArgumentTypeError(f"{text!r}: needs x0 < x1 and y0 < y1 (top-left, then bottom-right)")
    return region


def main() -> None:
    parser = consumer.parser(__doc__)
    parser.add_argument("--region", required=True, type=parse_region, help="x0,y0,x1,y1 in source pixels")
    args = consumer.parse_args(parser)
    last: dict[int, str] = {}

    def consume() -> None:
        for msg in consumer.messages(args):
            centroids = {o.obj_id: centroid(msg.mask(o.obj_id)) for o in msg.result.objects}
            for event in events_for(msg.result, centroids, args.region, last):
                consumer.say(json.dumps(event))

    consumer.run(parser, consume)


if __name__ == "__main__":
    main()
