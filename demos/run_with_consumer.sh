# Sourced by the demo wrappers: run_with_consumer TRACKER_CMD... -- CONSUMER_CMD...
# Starts the tracker and the consumer; whichever ends first ends the demo. The consumer
# ends after COUNT messages (exit 0); the tracker at the clip's end, or on an error,
# whose exit code the demo passes on (e.g. 2 and its one-line message: no checkpoint).
run_with_consumer() {
    local tracker_cmd=() consumer_cmd=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do tracker_cmd+=("$1"); shift; done
    shift
    consumer_cmd=("$@")
    "${tracker_cmd[@]}" &
    local tracker=$!
    "${consumer_cmd[@]}" &
    local consumer=$!
    trap 'kill $tracker $consumer 2>/dev/null; wait 2>/dev/null' EXIT
    local rc=0
    wait -n "$tracker" "$consumer" || rc=$?
    if kill -0 "$consumer" 2>/dev/null; then
        # The tracker ended: the consumer prints what is still on its way, then stops.
        sleep 1
        kill "$consumer" 2>/dev/null
        wait "$consumer" 2>/dev/null || true
    else
        kill "$tracker" 2>/dev/null
        wait "$tracker" 2>/dev/null || true
    fi
    trap - EXIT
    return "$rc"
}
