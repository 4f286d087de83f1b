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

from streamtrack.errors import UserError
from streamtrack.subscriber import Subscriber


def inside(region, bbox) -> bool:
    if bbox is None:
        return False
    cx, cy = (bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def events_for(result, region, last: dict[int, str]) -> list[dict]:
    """Compare each object's situation with the previous message's; return the changes."""
    out = []
    for obj in result.objects:
        now = "lost" if obj.state == "lost" else ("inside" if inside(region, obj.bbox) else "outside")
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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555")
    parser.add_argument("--region", required=True, type=parse_region, help="x0,y0,x1,y1 in source pixels")
    parser.add_argument("--count", type=int, default=0, help="stop after N messages (0 = forever)")
    args = parser.parse_args()
    if args.count < 0:
        parser.error(f"argument --count: '{args.count}': a number of messages, 0 or more")
    last: dict[int, str] = {}
    seen = 0
    try:
        with Subscriber(args.endpoint) as sub:
            for msg in sub:
                for event in events_for(msg.result, args.region, last):
                    print(json.dumps(event), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
    except UserError as e:  # a bad endpoint: one line, as the CLI says it
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130)


if __name__ == "__main__":
    main()
