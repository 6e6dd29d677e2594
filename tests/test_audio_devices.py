"""Device matching and the sounddevice backend's option checks: no sound server needed."""

from __future__ import annotations

import pytest

from hydrad.engine.backends.sounddevice import SounddeviceBackend
from hydrad.engine.devices import INPUT, OUTPUT, DeviceNotFound, _table, describe, match_device
from hydrad.engine.wire import Kind

from .audio.enginectl import EngineProc


def _dev(i, name, ins, outs, rate=44100.0, d_in=False, d_out=False, api="ALSA"):
    return {"index": i, "name": name, "hostapi": api, "max_input_channels": ins, "max_output_channels": outs,
            "default_samplerate": rate, "default_low_input_latency": 0.01, "default_low_output_latency": 0.01,
            "default_input": d_in, "default_output": d_out}


DEVICES = [
    _dev(0, "HDA Intel PCH: ALC3246 Analog (hw:0,0)", 2, 2, 48000.0),
    _dev(1, "USB PnP Sound Device: Audio (hw:1,0)", 1, 0, 48000.0),
    _dev(2, "HDMI 0", 0, 8),
    _dev(3, "pulse", 32, 32),
    _dev(4, "default", 32, 32, d_in=True, d_out=True),
]


def test_match_by_default_index_exact_and_substring():
    assert match_device(None, INPUT, DEVICES)["index"] == 4
    assert match_device("default", OUTPUT, DEVICES)["index"] == 4
    assert match_device(2, OUTPUT, DEVICES)["index"] == 2
    assert match_device("1", INPUT, DEVICES)["index"] == 1          # digits in a string are an index
    assert match_device("pulse", OUTPUT, DEVICES)["index"] == 3     # exact beats substring
    assert match_device("PULSE", OUTPUT, DEVICES)["index"] == 3     # then case-insensitive exact
    assert match_device("usb pnp", INPUT, DEVICES)["index"] == 1    # unique substring
    assert match_device("hdmi", OUTPUT, DEVICES)["index"] == 2


def test_match_considers_only_devices_of_that_direction():
    # "hw:" is in two names that both have inputs: ambiguous for input
    with pytest.raises(DeviceNotFound, match="matches several"):
        match_device("hw:", INPUT, DEVICES)
    # for output, the USB mic (no output channels) is not a candidate
    assert match_device("hw:", OUTPUT, DEVICES)["index"] == 0
    with pytest.raises(DeviceNotFound, match="has no input channels"):
        match_device(2, INPUT, DEVICES)


def test_no_match_lists_the_devices_of_that_direction():
    with pytest.raises(DeviceNotFound) as exc:
        match_device("Jabra", INPUT, DEVICES)
    msg = str(exc.value)
    assert "no input device matches 'Jabra'" in msg
    for name in ("USB PnP Sound Device", "HDA Intel PCH", "pulse", "default"):
        assert name in msg
    assert "HDMI 0" not in msg  # output-only: not an input candidate
    assert "[4] 'default' ALSA, 32 in / 32 out, 44100 Hz (default input)" in msg
    with pytest.raises(DeviceNotFound, match="no output device with index 9"):
        match_device(9, OUTPUT, DEVICES)
    with pytest.raises(DeviceNotFound, match="no audio devices at all"):
        match_device(None, OUTPUT, [])


def test_describe_and_table():
    assert describe([], INPUT) == "  (no input devices)"
    table = _table(DEVICES).splitlines()
    assert table[0].split() == ["idx", "name", "host", "API", "in", "out", "rate", "default"]
    assert table[-1].split()[:2] == ["4", "default"] and table[-1].endswith("in/out")
    assert len({len(t) for t in table[:2]}) == 1  # header and rule line up


@pytest.mark.parametrize("options, word", [
    ({"latency": "medium"}, "latency"),
    ({"latency": -1}, "latency"),
    ({"input_rate": 1000}, "input_rate"),
    ({"output_channels": 0}, "output_channels"),
    ({"input_device": 1.5}, "input_device"),
    ({"outptu_device": "x"}, "unknown sounddevice option"),
    ({"stall_s": 0}, "stall_s"),
])
def test_backend_rejects_bad_options_before_touching_portaudio(options, word):
    with pytest.raises(ValueError, match=word):
        SounddeviceBackend(options, 10.0, host=None)  # type: ignore[arg-type]


def test_engine_exits_3_on_bad_volume_or_backend_option():
    for options, word in (({"output_volume": 5.0}, "output_volume"), ({"latency": "medium"}, "latency")):
        e = EngineProc()
        try:
            e.config(options, wait=False)
            assert e.p.wait(10) == 3
            log = e.wait_json(Kind.LOG, lambda o: o.get("event") == "config_invalid")
            assert word in log["error"], log
        finally:
            e.kill()


class _TI:
    def __init__(self, cur: float, adc: float, dac: float) -> None:
        self.currentTime, self.inputBufferAdcTime, self.outputBufferDacTime = cur, adc, dac


def _guard_backend(events: list) -> SounddeviceBackend:
    """A backend with the state open()/start() would set, without PortAudio."""
    b = object.__new__(SounddeviceBackend)

    class Host:
        def device_event(self, state, error=None):
            events.append((state, error))

    b.host = Host()
    b.block_ms, b._in_lat, b._out_lat, b._in_rate, b._out_rate = 10.0, 0.02, 0.03, 48000, 48000
    b._gen, b._closing, b._lost, b._guard_events, b._win = 1, False, False, 0, 5
    b._in_min_cur = b._out_min_cur = 1e9
    b._in_n = b._out_n = b._in_wins = b._out_wins = 0
    b._in_min_win = b._out_min_win = 0.0
    b._adc_max, b._dac_min, b._dac_max = 0.0, 1e9, 0.0
    return b


def test_latency_guard_reopens_only_when_the_input_delay_stays_high():
    events: list = []
    b = _guard_backend(events)
    state = [0, 0, 0, 0]

    def feed(adc_delay: float, n: int) -> None:
        for _ in range(n):
            t_adc = b._times_in(100.0, _TI(50.0, 50.0 - adc_delay, 50.0), 480)
            assert t_adc == pytest.approx(100.0 - adc_delay)
            b._times_out(100.0, _TI(50.0, 50.0, 50.029))

    feed(0.012, 20)                           # normal: 12 ms
    assert not b._latency_guard(1, state)
    feed(0.012, 4)
    feed(0.300, 1)                            # one spike in a window: its minimum stays low
    assert not b._latency_guard(1, state)
    feed(0.150, 5)                            # one whole window stuck at 150 ms: not yet
    assert not b._latency_guard(1, state) and not events
    feed(0.150, 5)                            # two in a row: lost, once
    assert b._latency_guard(1, state)
    assert events and events[0][0] == "lost" and "input latency stuck at 150 ms" in events[0][1]
    feed(0.150, 10)
    b._latency_guard(1, state)
    assert len(events) == 1 and b._guard_events == 1


def test_latency_guard_watches_the_output_too_and_ignores_a_closing_stream():
    events: list = []
    b = _guard_backend(events)
    state = [0, 0, 0, 0]

    def window(dac_delay: float) -> bool:
        for _ in range(5):
            b._times_out(0.0, _TI(1.0, 1.0, 1.0 + dac_delay))
        return b._latency_guard(1, state)

    assert not window(0.029) and not window(0.060)   # 60 ms where 30 were reported: one window
    b._closing = True
    assert window(0.060) and not events               # a stream being closed reports nothing
    b._closing, b._lost, state[:] = False, False, [0, 0, 0, 0]
    assert not window(0.060) and window(0.060)
    assert len(events) == 1 and "output latency stuck at 60 ms" in events[0][1]
