#!/usr/bin/env bash
# Track an RTSP camera (or the sample clip, replayed live) and print an event when
# object 1 leaves the left half of the picture or is lost.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ge 1 ]; then
    streamtrack run "$1" --config rtsp --box "${BOX:-100,80,220,200}" -q &
else
    streamtrack run demos/sample.mp4 --prompts demos/sample_prompts.json --realtime \
        --publish tcp://127.0.0.1:5555 -q &
fi
tracker=$!
trap 'kill $tracker 2>/dev/null; wait $tracker 2>/dev/null' EXIT
python demos/region_monitor.py tcp://127.0.0.1:5555 --region "${REGION:-0,0,160,240}" --count "${COUNT:-0}"
