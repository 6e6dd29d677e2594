"""``wav`` backend: a scripted microphone and a recording speaker, both at real time.

Options:

``mic``: list of ``{"path": WAV, "at": seconds}``. Each file plays into the microphone
    starting ``at`` seconds after the ``t0`` of the last GATE open; silence elsewhere
    (overlaps are mixed). Before any GATE nothing plays. Any rate and channel count is
    accepted: the input "device" runs at ``mic_rate``/``mic_channels`` (default: those of the
    first file, else 16000 Hz mono) and other files are converted to it when loaded; the
    engine's capture path then downmixes and resamples to 16 kHz like for a real device.
    Integer PCM of 8/16/24/32 bits.
``speaker``: path of a PCM16 mono WAV, written at real time at ``speaker_rate`` (default
    24000) with silence where nothing plays. Without it the output is discarded.
``t0_speaker``: monotonic origin of the speaker timeline: sample ``i`` of the file is the
    instant ``t0_speaker + i / speaker_rate``. The clock ticks are anchored on it, so the
    file position of every output block is exact. Given, an existing file is reopened and
    continued (the gap since it was last written reads as silence); absent, the origin is
    the moment the backend first opens and the file is created anew.

The header of the speaker file is patched after every write, so the file is a valid WAV at
every instant (the engine may be SIGKILLed).
"""

from __future__ import annotations

import os
import struct
import wave
from typing import Any

import numpy as np
import soxr

from .base import DeviceError, Host
from .clock import ClockedBackend

_HEADER = struct.Struct("<4sI4s4sIHHIIHH4sI")  # canonical 44-byte PCM header


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """``(float32 frames x channels in [-1, 1), rate)`` of an integer-PCM WAV."""
    try:
        with wave.open(path, "rb") as w:
            rate, ch, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (OSError, EOFError, wave.Error) as exc:
        raise DeviceError(f"cannot read mic WAV {path!r}: {exc}") from None
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(raw, "<i4").astype(np.float64) / 2.0**31).astype(np.float32)
    else:
        raise DeviceError(f"mic WAV {path!r}: unsupported sample width {width}")
    return x.reshape(-1, ch), rate


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


class SpeakerFile:
    """A PCM16 mono WAV written at absolute sample positions, header valid after every write."""

    def __init__(self, path: str, rate: int, append: bool) -> None:
        self.path, self.rate = path, rate
        if append and os.path.exists(path):
            self.fd = os.open(path, os.O_RDWR)
            try:
                self.data_offset, self.data_len = self._parse()
            except Exception:
                os.close(self.fd)
                raise
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.data_offset, self.data_len = 44, 0
            os.pwrite(self.fd, self._header(0), 0)

    def _header(self, data_len: int) -> bytes:
        return _HEADER.pack(b"RIFF", 36 + data_len, b"WAVE", b"fmt ", 16, 1, 1, self.rate,
                            self.rate * 2, 2, 16, b"data", data_len)

    def _parse(self) -> tuple[int, int]:
        head = os.pread(self.fd, 12, 0)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise DeviceError(f"speaker file {self.path!r} exists and is not a WAV")
        pos, fmt = 12, None
        size = os.fstat(self.fd).st_size
        while pos + 8 <= size:
            cid, clen = struct.unpack("<4sI", os.pread(self.fd, 8, pos))
            if cid == b"fmt ":
                fmt = struct.unpack("<HHIIHH", os.pread(self.fd, 16, pos + 8))
            elif cid == b"data":
                if fmt is None or fmt[0] != 1 or fmt[1] != 1 or fmt[5] != 16 or fmt[2] != self.rate:
                    raise DeviceError(
                        f"speaker file {self.path!r} is not PCM16 mono at {self.rate} Hz "
                        f"(format, channels, rate, ..., bits = {fmt}): cannot continue it"
                    )
                # data must be the last chunk: we extend it. Bytes past the declared length
                # (a SIGKILL between the data write and the header patch) are kept.
                clen = max(clen, size - (pos + 8))
                return pos + 8, clen - clen % 2
            pos += 8 + clen + (clen & 1)
        raise DeviceError(f"speaker file {self.path!r} has no data chunk")

    def write_at(self, index: int, pcm: np.ndarray) -> None:
        """Write int16 samples so that ``pcm[0]`` lands at sample ``index`` of the timeline.
        A gap before it reads as silence (the file is extended with a hole)."""
        if index < 0:
            pcm = pcm[-index:]
            index = 0
        if not len(pcm):
            return
        os.pwrite(self.fd, pcm.tobytes(), self.data_offset + 2 * index)  # bytes: any strides
        end = 2 * (index + len(pcm))
        if end > self.data_len:
            self.data_len = end
            os.pwrite(self.fd, struct.pack("<I", self.data_offset + end - 8), 4)
            os.pwrite(self.fd, struct.pack("<I", end), self.data_offset - 4)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class WavBackend(ClockedBackend):
    name = "wav"
    in_dtype = np.int16
    out_dtype = np.int16

    def __init__(self, options: dict[str, Any], block_ms: float, host: Host) -> None:
        super().__init__(options, block_ms, host)
        mic = options.get("mic") or []
        if not isinstance(mic, list) or not all(
            isinstance(m, dict) and isinstance(m.get("path"), str) for m in mic
        ):
            raise ValueError('wav option "mic" must be a list of {"path": str, "at": seconds}')
        self._mic_spec = [(m["path"], float(m.get("at", 0.0))) for m in mic]
        self._speaker_path = options.get("speaker")
        self.out_rate = int(options.get("speaker_rate", 24000))
        if self.out_rate < 1000:
            raise ValueError("speaker_rate must be >= 1000")
        t0 = options.get("t0_speaker")
        self._append = t0 is not None
        if t0 is not None:
            self.anchor = float(t0)
        self._mic_data: list[np.ndarray] | None = None  # int16 frames x in_channels, per spec
        self._schedule: tuple[tuple[int, np.ndarray], ...] = ()
        self._speaker: SpeakerFile | None = None
        self._mix = np.zeros((0, 1), np.int32)

    def _load_mic(self) -> None:
        files = [read_wav(p) for p, _ in self._mic_spec]
        rate = self.options.get("mic_rate") or (files[0][1] if files else 16000)
        ch = self.options.get("mic_channels") or (files[0][0].shape[1] if files else 1)
        self.in_rate, self.in_channels = int(rate), int(ch)
        data = []
        for x, r in files:
            if x.shape[1] != self.in_channels:
                mono = x.mean(axis=1, keepdims=True)
                x = np.repeat(mono, self.in_channels, axis=1)
            if r != self.in_rate and len(x):
                x = soxr.resample(x, r, self.in_rate, quality="HQ").reshape(-1, self.in_channels)
            data.append(_to_int16(x))
        self._mic_data = data

    def _open_devices(self) -> None:
        if self._mic_data is None:
            self._load_mic()
        if self._speaker_path:
            try:
                self._speaker = SpeakerFile(str(self._speaker_path), self.out_rate, self._append)
            except (OSError, struct.error) as exc:
                raise DeviceError(f"cannot open speaker file {self._speaker_path!r}: {exc}") from None
            # later opens (reopen after a fault) continue the same timeline
            self._append = True
        self._mix = np.zeros((int(self.block * self.in_rate) + 2, self.in_channels), np.int32)

    def _close_devices(self) -> None:
        if self._speaker is not None:
            self._speaker.close()
            self._speaker = None

    def _info(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        inp, out = super()._info()
        assert inp is not None and out is not None
        inp["name"] = "wav:mic"
        inp["files"] = len(self._mic_spec)
        out["name"] = "wav:speaker" if self._speaker_path else "wav:discard"
        out["path"] = self._speaker_path
        out["t0_speaker"] = self.anchor
        return inp, out

    def gate(self, open_: bool, t0: float) -> None:
        """Anchor the mic schedule on ``t0`` (closing the gate leaves it running: the person
        talking into the mic does not stop because the uplink gate closed)."""
        if not open_ or self._mic_data is None or self.anchor is None:
            return
        sched = []
        for (_, at), data in zip(self._mic_spec, self._mic_data):
            start = int(round((t0 + at - self.anchor) * self.in_rate))
            sched.append((start, data))
        self._schedule = tuple(sched)  # one reference swap: the clock thread sees old or new

    def _fill_input(self, start: int, buf: np.ndarray) -> None:
        sched = self._schedule
        n = len(buf)
        hits = [(s, d) for s, d in sched if s < start + n and s + len(d) > start]
        if not hits:
            buf.fill(0)
        elif len(hits) == 1:
            s, d = hits[0]
            buf.fill(0)
            a, b = max(start, s), min(start + n, s + len(d))
            buf[a - start : b - start] = d[a - s : b - s]
        else:
            mix = self._mix[:n]
            mix.fill(0)
            for s, d in hits:
                a, b = max(start, s), min(start + n, s + len(d))
                mix[a - start : b - start] += d[a - s : b - s]
            np.clip(mix, -32768, 32767, out=mix)
            buf[:] = mix

    def _consume_output(self, start: int, buf: np.ndarray) -> None:
        if self._speaker is not None:
            self._speaker.write_at(start, buf[:, 0])
