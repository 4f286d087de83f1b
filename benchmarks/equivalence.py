"""Streaming engine vs the official SAM2VideoPredictor on any device and input size.

The test suite checks this on the CPU at a 256 input; this script repeats the check
where the tests cannot run (a GPU, the full 1024 input):

    python benchmarks/equivalence.py --device cuda --image-size 1024 --frames 24

Prints the worst per-frame mask IoU and mean |low-res logit difference| over all
objects and frames (box, fg/bg points and mask prompts on frame 0, a refinement
and a new object mid-clip).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import options  # noqa: E402  (benchmarks/options.py)
from conftest import save_jpeg_frames  # noqa: E402
from official import compare, run_engine, run_official  # noqa: E402

from streamtrack.engine import EngineConfig, Prompt, StreamingEngine  # noqa: E402
from streamtrack.models import build_model, save_random_checkpoint  # noqa: E402
from streamtrack.synthetic import make_clip  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", type=options.device, default="cpu")
    parser.add_argument("--image-size", type=options.image_size, default=256)
    parser.add_argument("--frames", type=options.count(4), default=24,
                        help="frames of the clip (a refinement and a new object come half-way)")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # ~150 MB of checkpoint
    ckpt = save_random_checkpoint("sam2.1_hiera_tiny", tmp / "random.pt")
    clip = make_clip(args.frames, 320, 240, num_objects=3, seed=1)
    frames = save_jpeg_frames(clip.frames, tmp / "jpeg")
    mid = args.frames // 2
    prompts = {
        0: [Prompt.make(1, box=clip.box(1, 0)),
            Prompt.make(2, points=[clip.center(2, 0), [2.0, 2.0]], labels=[1, 0]),
            Prompt.make(3, mask=clip.masks[3][0])],
        mid: [Prompt.make(1, points=[clip.center(1, mid)]), Prompt.make(4, box=clip.box(3, mid))],
    }
    ref = run_official(ckpt, tmp / "jpeg", args.frames, prompts, args.image_size, device=args.device)
    model = build_model("sam2.1_hiera_tiny", ckpt, image_size=args.image_size, device=args.device)
    engine = StreamingEngine(model, EngineConfig(preprocess="exact", bf16=False))
    iou, diff, where = compare(ref, run_engine(engine, frames, prompts))
    print(f"equivalence on {args.device}, input {args.image_size}, {args.frames} frames, 4 objects: "
          f"worst mask IoU {iou:.6f}, worst mean |logit diff| {diff:.2e} (at frame/object {where})")


if __name__ == "__main__":
    main()
