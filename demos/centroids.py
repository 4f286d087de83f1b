"""Consume the mask stream in another process: centroid and area per object.

    streamtrack run demos/sample.mp4 --prompts demos/sample_prompts.json \
        --publish tcp://127.0.0.1:5555 &
    python demos/centroids.py tcp://127.0.0.1:5555

Prints one line per received frame; masks are decoded only here, on demand.
"""

from __future__ import annotations

import argparse

import numpy as np

from streamtrack.errors import UserError
from streamtrack.subscriber import Subscriber


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(mask)
    return (float(xs.mean()), float(ys.mean())) if len(xs) else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("endpoint", nargs="?", default="tcp://127.0.0.1:5555")
    parser.add_argument("--count", type=int, default=0, help="stop after N messages (0 = forever)")
    args = parser.parse_args()
    if args.count < 0:
        parser.error(f"argument --count: '{args.count}': a number of messages, 0 or more")
    seen = 0
    try:
        with Subscriber(args.endpoint) as sub:
            for msg in sub:
                parts = []
                for obj in msg.result.objects:
                    c = centroid(msg.mask(obj.obj_id))
                    where = f"({c[0]:.0f},{c[1]:.0f})" if c else "-"
                    parts.append(f"#{obj.obj_id} {obj.state} area={obj.area} centroid={where}")
                print(f"frame {msg.result.frame_id}: " + "; ".join(parts or ["no objects"]), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
    except UserError as e:  # a bad endpoint: one line, as the CLI says it
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130)


if __name__ == "__main__":
    main()
