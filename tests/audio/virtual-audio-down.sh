#!/usr/bin/env bash
# Stop the PulseAudio started by virtual-audio-up.sh, by the PID in its pid file (never by name).
DIR=${1:?usage: virtual-audio-down.sh DIR}
[ -f "$DIR/run/pid" ] || exit 0
PID=$(cat "$DIR/run/pid")
kill "$PID" 2>/dev/null || exit 0
for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || exit 0; sleep 0.05; done
kill -9 "$PID" 2>/dev/null || true
