#!/usr/bin/env bash
# Start a private PulseAudio with a virtual speaker and a virtual microphone (no sound card).
#
#   eval "$(bash tests/audio/virtual-audio-up.sh [DIR])"
#
# exports PULSE_SERVER PULSE_RUNTIME_PATH PULSE_STATE_PATH PULSE_COOKIE XDG_CONFIG_HOME VAUDIO_DIR.
# Graph (all sinks at $VAUDIO_RATE Hz, $VAUDIO_CHANNELS channels; default 16000 / 1):
#   sink  vspk     the virtual speaker (default sink); record it from vspk.monitor
#   sink  micfeed  what is played into it comes out of the source vmic
#   source vmic    the virtual microphone (default source)
# PortAudio (ALSA host API) sees `default`/`pulse` (-> vspk/vmic) plus two named PCMs that this
# script writes to $XDG_CONFIG_HOME/alsa/asoundrc: `virtual_speaker` (-> vspk, output) and
# `virtual_mic` (-> vmic, input).
#   feed the mic:        paplay --device=micfeed --latency-msec=10 utterance.wav
#   record the speaker:  parecord --device=vspk.monitor --latency-msec=10 --file-format=wav out.wav
# Stop: bash tests/audio/virtual-audio-down.sh "$VAUDIO_DIR"  (by PID, never by name)
# Diagnostics: VAUDIO_LOG_LEVEL=info (or debug) and VAUDIO_LOG_TIME=1 for $DIR/pulseaudio.log.
#
# Two PulseAudio behaviours are worked around (see docs/benchmarks.md, "Virtual devices"):
# an idle null sink renders 2 s ahead, so the first stream stalls up to 2 s (fix: permanent
# 30 ms readers on both monitors, attached while the sinks are suspended); and a new stream
# makes the sink rewind, which clips its first ~9 ms in the monitor (fix: norewinds=1).
set -euo pipefail
DIR=${1:-$(mktemp -d /tmp/hydrad-vaudio.XXXXXX)}
RATE=${VAUDIO_RATE:-16000}; CH=${VAUDIO_CHANNELS:-1}

need=()
for p in libportaudio2 pulseaudio pulseaudio-utils libasound2-plugins; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

mkdir -p "$DIR/run" "$DIR/state" "$DIR/xdg/alsa"; chmod 700 "$DIR/run" "$DIR/state"
cat > "$DIR/virtual.pa" <<PA
load-module module-native-protocol-unix auth-anonymous=1 auth-cookie-enabled=0
load-module module-null-sink sink_name=vspk rate=$RATE channels=$CH norewinds=1 sink_properties=device.description=VirtualSpeaker
load-module module-null-sink sink_name=micfeed rate=$RATE channels=$CH norewinds=1 sink_properties=device.description=MicFeed
load-module module-null-sink sink_name=blackhole rate=$RATE channels=$CH sink_properties=device.description=Blackhole
suspend-sink vspk 1
suspend-sink micfeed 1
load-module module-remap-source master=micfeed.monitor source_name=vmic rate=$RATE channels=$CH source_properties=device.description=VirtualMic
load-module module-loopback source=vspk.monitor sink=blackhole latency_msec=30 source_dont_move=true sink_dont_move=true
load-module module-loopback source=micfeed.monitor sink=blackhole latency_msec=30 source_dont_move=true sink_dont_move=true
suspend-sink vspk 0
suspend-sink micfeed 0
set-default-sink vspk
set-default-source vmic
PA
cat > "$DIR/xdg/alsa/asoundrc" <<ALSA
pcm.virtual_mic { type pulse; device "vmic"; hint { show on; description "Virtual mic" } }
pcm.virtual_speaker { type pulse; device "vspk"; hint { show on; description "Virtual speaker" } }
ALSA

export PULSE_RUNTIME_PATH="$DIR/run" PULSE_STATE_PATH="$DIR/state" PULSE_COOKIE="$DIR/cookie"
# root only gets a warning; --exit-idle-time=-1 or it quits after 20 s idle
pulseaudio --daemonize=yes -n --file="$DIR/virtual.pa" --exit-idle-time=-1 \
  --log-target=file:"$DIR/pulseaudio.log" --log-level="${VAUDIO_LOG_LEVEL:-notice}" ${VAUDIO_LOG_TIME:+--log-time=1} >&2
export PULSE_SERVER="unix:$DIR/run/native"
for _ in $(seq 100); do pactl info >/dev/null 2>&1 && break; sleep 0.05; done
pactl info >/dev/null || { cat "$DIR/pulseaudio.log" >&2; exit 1; }
echo "export PULSE_SERVER='$PULSE_SERVER' PULSE_RUNTIME_PATH='$DIR/run' PULSE_STATE_PATH='$DIR/state'" \
     "PULSE_COOKIE='$DIR/cookie' XDG_CONFIG_HOME='$DIR/xdg' VAUDIO_DIR='$DIR'"
