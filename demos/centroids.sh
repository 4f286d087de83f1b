#!/usr/bin/env bash
# Track the sample clip, publish masks, print centroid/area per object; ends with the clip
# (or after COUNT messages). Options are passed to `streamtrack run` (e.g. --checkpoint FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
source demos/run_with_consumer.sh
run_with_consumer streamtrack run demos/sample.mp4 --prompts demos/sample_prompts.json \
        --publish tcp://127.0.0.1:5555 -q "$@" \
    -- python demos/centroids.py tcp://127.0.0.1:5555 --count "${COUNT:-0}"
