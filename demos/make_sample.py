"""Regenerate demos/sample.mp4 and demos/sample_prompts.json (synthetic, with known masks)."""

import json
from pathlib import Path

from streamtrack.synthetic import make_clip, write_video

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    clip = make_clip(num_frames=90, width=320, height=240, num_objects=3, seed=7)
    write_video(clip.frames, HERE / "sample.mp4", fps=clip.fps, gop=15, crf=20)
    prompts = [
        {"obj_id": 1, "frame": 0, "box": [round(v) for v in clip.box(1)]},
        {"obj_id": 2, "frame": 0, "points": [[round(v) for v in clip.center(2)]], "labels": [1]},
        {"obj_id": 3, "frame": 0, "box": [round(v) for v in clip.box(3)]},
    ]
    lines = ",\n ".join(json.dumps(p) for p in prompts)
    (HERE / "sample_prompts.json").write_text(f"[{lines}]\n")
    print(f"wrote {HERE / 'sample.mp4'} ({len(clip.frames)} frames) and sample_prompts.json")
