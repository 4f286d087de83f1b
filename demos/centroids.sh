#!/usr/bin/env bash
# Track the sample clip in real time, publish masks, print centroid/area per object.
set -euo pipefail
cd "$(dirname "$0")/.."
streamtrack run demos/sample.mp4 --prompts demos/sample_prompts.json --realtime \
    --publish tcp://127.0.0.1:5555 -q "$@" &
tracker=$!
trap 'kill $tracker 2>/dev/null; wait $tracker 2>/dev/null' EXIT
python demos/centroids.py tcp://127.0.0.1:5555 --count "${COUNT:-0}"
