#!/usr/bin/env bash
# Track an RTSP camera (or the sample clip) and print an event when a tracked object (the
# camera's: the one in BOX) leaves REGION (x0,y0,x1,y1 in the source's pixels; default
# 0,0,160,240, the left half of the 320x240 sample) or is lost; ends with the clip (a
# camera: Ctrl-C), or after COUNT messages. Options after the URL are passed to
# `streamtrack run` (e.g. --checkpoint FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
source demos/run_with_consumer.sh
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then
    url=$1
    shift
    tracker=(streamtrack run "$url" --config rtsp --box "${BOX:-100,80,220,200}" -q "$@")
else
    tracker=(streamtrack run demos/sample.mp4 --prompts demos/sample_prompts.json
             --publish tcp://127.0.0.1:5555 -q "$@")
fi
run_with_consumer "${tracker[@]}" \
    -- python demos/region_monitor.py tcp://127.0.0.1:5555 --region "${REGION:-0,0,160,240}" --count "${COUNT:-0}"
