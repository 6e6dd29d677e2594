"""Audio devices as PortAudio sees them: ``hydrad devices`` and the device matching of the
``sounddevice`` backend.

Matching (:func:`match_device`), separately for input and output:

* ``None``: the host's default device of that direction (PortAudio's default; if there is
  none, the first device that has channels in that direction);
* an ``int`` (or a string of digits): that device index;
* a string: a device whose name equals it (case-sensitive first, then case-insensitive),
  else the one device whose name contains it (case-insensitive).

Only devices with channels in the wanted direction are candidates. When nothing matches,
or a substring matches several devices, :class:`DeviceNotFound` says so and lists the
devices of that direction (index, name, host API, channels, default rate), so an operator
can fix the configuration from the log line alone.

This module imports ``sounddevice`` only inside functions: ``import sounddevice`` loads and
initialises PortAudio, which must happen after the sound server is reachable.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

INPUT, OUTPUT = "input", "output"


class DeviceNotFound(LookupError):
    """No device (or more than one) matches a configured device."""


def load_sounddevice() -> Any:
    """``import sounddevice``, turning a missing PortAudio library into an ImportError."""
    try:
        import sounddevice as sd
    except ImportError:
        raise
    except Exception as exc:  # OSError "PortAudio library not found", PortAudioError from Pa_Initialize
        raise ImportError(f"sounddevice/PortAudio unavailable: {exc} (install libportaudio2)") from None
    return sd


def reinitialize(sd: Any) -> None:
    """Re-initialise PortAudio so that its device list is read again (devices that appeared
    or disappeared since ``import sounddevice``). Only call it with no stream open.
    PortAudio writes ALSA probe noise to stderr while initialising; sounddevice silences it."""
    if sd._initialized:
        sd._terminate()
    sd._initialize()


def list_devices(sd: Any) -> list[dict[str, Any]]:
    """Every device PortAudio knows, as plain dicts (JSON-ready)."""
    try:
        raw = sd.query_devices()
        apis = sd.query_hostapis()
    except Exception:  # PortAudio not initialised or broken: no devices
        return []
    try:
        d_in, d_out = sd.default.device
    except Exception:
        d_in, d_out = -1, -1
    out = []
    for dev in raw:
        i = int(dev["index"])
        api = apis[dev["hostapi"]]["name"] if 0 <= dev["hostapi"] < len(apis) else str(dev["hostapi"])
        out.append({
            "index": i,
            "name": dev["name"],
            "hostapi": api,
            "max_input_channels": int(dev["max_input_channels"]),
            "max_output_channels": int(dev["max_output_channels"]),
            "default_samplerate": float(dev["default_samplerate"]),
            "default_low_input_latency": float(dev["default_low_input_latency"]),
            "default_low_output_latency": float(dev["default_low_output_latency"]),
            "default_input": i == d_in,
            "default_output": i == d_out,
        })
    return out


def _channels(dev: dict[str, Any], kind: str) -> int:
    return int(dev["max_input_channels" if kind == INPUT else "max_output_channels"])


def describe(devices: Sequence[dict[str, Any]], kind: str | None = None) -> str:
    """One line per device (of ``kind``, or all), for error messages."""
    lines = []
    for d in devices:
        if kind is not None and _channels(d, kind) <= 0:
            continue
        mark = ""
        if d.get("default_input") and kind in (None, INPUT):
            mark += " (default input)"
        if d.get("default_output") and kind in (None, OUTPUT):
            mark += " (default output)"
        lines.append(f"  [{d['index']}] {d['name']!r} {d['hostapi']}, {d['max_input_channels']} in / "
                     f"{d['max_output_channels']} out, {d['default_samplerate']:g} Hz{mark}")
    if not lines:
        return "  (none)" if kind is None else f"  (no {kind} devices)"
    return "\n".join(lines)


def match_device(spec: str | int | None, kind: str, devices: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The device ``spec`` names, among ``devices`` with channels in direction ``kind``.
    Raises :class:`DeviceNotFound` (message lists the candidates)."""
    if kind not in (INPUT, OUTPUT):
        raise ValueError(f"kind must be {INPUT!r} or {OUTPUT!r}")
    cands = [d for d in devices if _channels(d, kind) > 0]
    if not devices:
        raise DeviceNotFound(f"no audio devices at all (PortAudio lists none): no {kind} device")
    where = f"{kind} devices:\n{describe(devices, kind)}"
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec.strip())
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "default")):
        flag = "default_input" if kind == INPUT else "default_output"
        for d in cands:
            if d.get(flag):
                return d
        if cands:
            return cands[0]
        raise DeviceNotFound(f"no {kind} device; {where}")
    if isinstance(spec, bool) or not isinstance(spec, (int, str)):
        raise DeviceNotFound(f"{kind} device {spec!r}: expected an index or a name; {where}")
    if isinstance(spec, int):
        for d in devices:
            if d["index"] == spec:
                if _channels(d, kind) <= 0:
                    raise DeviceNotFound(f"{kind} device {spec} ({d['name']!r}) has no {kind} channels; {where}")
                return d
        raise DeviceNotFound(f"no {kind} device with index {spec}; {where}")
    exact = [d for d in cands if d["name"] == spec]
    if not exact:
        exact = [d for d in cands if d["name"].lower() == spec.lower()]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        raise DeviceNotFound(f"{kind} device name {spec!r} is ambiguous (several devices have it); "
                             f"use an index; {where}")
    sub = [d for d in cands if spec.lower() in d["name"].lower()]
    if len(sub) == 1:
        return sub[0]
    if len(sub) > 1:
        names = ", ".join(f"[{d['index']}] {d['name']!r}" for d in sub)
        raise DeviceNotFound(f"{kind} device {spec!r} matches several devices ({names}); "
                             f"give the exact name or an index; {where}")
    raise DeviceNotFound(f"no {kind} device matches {spec!r}; {where}")


def check_devices(input_device: str | int | None, output_device: str | int | None) -> list[str]:
    """Problems with configured devices, one line each (empty: both match, or PortAudio lists
    no devices at all, which the engine treats as "unavailable, retry" rather than an error).
    For ``hydrad check-config``; imports sounddevice (initialises PortAudio)."""
    try:
        sd = load_sounddevice()
    except ImportError as exc:
        return [f"audio.sounddevice: {exc}"]
    devices = list_devices(sd)
    if not devices:
        return []
    problems = []
    for key, spec, kind in (("input_device", input_device, INPUT), ("output_device", output_device, OUTPUT)):
        try:
            match_device(spec, kind, devices)
        except DeviceNotFound as exc:
            problems.append(f"audio.sounddevice.{key} = {spec!r}: {exc}")
    return problems


# ---- hydrad devices ----------------------------------------------------------------------------

def _table(devices: Sequence[dict[str, Any]]) -> str:
    head = ("idx", "name", "host API", "in", "out", "rate", "default")
    rows = []
    for d in devices:
        dflt = "/".join(k for k, f in (("in", "default_input"), ("out", "default_output")) if d.get(f))
        rows.append((str(d["index"]), d["name"], d["hostapi"], str(d["max_input_channels"]),
                     str(d["max_output_channels"]), f"{d['default_samplerate']:g}", dflt))
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    right = {0, 3, 4, 5}

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def devices_main(argv: Sequence[str]) -> int:
    """``hydrad devices [--json] [--input|--output]``: the devices PortAudio sees."""
    ap = argparse.ArgumentParser(prog="hydrad devices",
                                 description="List the audio devices (PortAudio) with index, name, host API, "
                                             "channels and default rate. Use an index or a name (or a unique "
                                             "part of it) as audio.sounddevice.input_device/output_device.")
    ap.add_argument("--json", action="store_true", help="JSON (a list of objects) instead of a table")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--input", action="store_true", help="only devices with input channels")
    g.add_argument("--output", action="store_true", help="only devices with output channels")
    args = ap.parse_args(list(argv))
    try:
        sd = load_sounddevice()
    except ImportError as exc:
        print(f"hydrad devices: {exc}", file=sys.stderr)
        return 1
    devices = list_devices(sd)
    if args.input:
        devices = [d for d in devices if d["max_input_channels"] > 0]
    if args.output:
        devices = [d for d in devices if d["max_output_channels"] > 0]
    if args.json:
        print(json.dumps(devices, indent=2))
        return 0
    if not devices:
        print("no audio devices (PortAudio lists none: no sound card, or no sound server running)")
        return 0
    print(_table(devices))
    return 0
