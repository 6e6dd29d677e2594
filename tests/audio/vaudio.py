"""Virtual audio devices for tests and benchmarks: a private PulseAudio with a virtual speaker
and a virtual microphone, a speaker recorder with a monotonic timeline, a mic feeder, and
deterministic test utterances.

Real PortAudio I/O: the engine opens ALSA ``default`` (or the named PCMs ``virtual_speaker``
/ ``virtual_mic``), which the ALSA ``pulse`` plugin routes to this PulseAudio. The server is
started by ``virtual-audio-up.sh`` (next to this file) and stopped by its PID. Nothing here
touches ``$HOME``: the server's runtime, state, cookie and the ALSA config live in one
temporary directory, and child processes find it through the exported environment
(:attr:`VirtualAudio.env`).

Timelines: :class:`Recorder` reads ``parec`` raw PCM from the speaker's monitor and stamps
every chunk with ``time.monotonic()`` on arrival. Data can only arrive after the sink
rendered it, so ``min(arrival - samples_so_far / rate)`` over all chunks is the monotonic
instant of sample 0, late by at most the quickest delivery (sub-millisecond to a few ms).
A null sink has no DAC: its monitor gets a sample when the sink renders it, which is the
sink's own latency (about 10 ms here) *before* the instant PortAudio reports as the DAC time
(measured: -10.1 ms, constant to 0.1 ms). Tests state which timeline a bound uses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
UP = HERE / "virtual-audio-up.sh"
DOWN = HERE / "virtual-audio-down.sh"
_ENV_KEYS = ("PULSE_SERVER", "PULSE_RUNTIME_PATH", "PULSE_STATE_PATH", "PULSE_COOKIE", "XDG_CONFIG_HOME", "VAUDIO_DIR")


class VirtualAudioError(RuntimeError):
    pass


class VirtualAudio:
    """One private PulseAudio server: sinks ``vspk`` (speaker) and ``micfeed`` (-> source ``vmic``)
    at ``rate`` Hz / ``channels``."""

    def __init__(self, rate: int = 16000, channels: int = 1, directory: str | None = None) -> None:
        self.rate, self.channels = int(rate), int(channels)
        self.dir = Path(directory or tempfile.mkdtemp(prefix="hydrad-vaudio."))
        self.env: dict[str, str] = {}
        self.pid: int | None = None
        self._children: list[subprocess.Popen[bytes]] = []

    # ---- server ---------------------------------------------------------------------------------
    def start(self) -> "VirtualAudio":
        for tool in ("pulseaudio", "pactl", "parec", "paplay", "pacat"):
            if shutil.which(tool) is None:
                raise VirtualAudioError(f"{tool} not found: run `bash .ci/setup` (installs pulseaudio, "
                                        "pulseaudio-utils, libasound2-plugins, libportaudio2)")
        env = {**os.environ, "VAUDIO_RATE": str(self.rate), "VAUDIO_CHANNELS": str(self.channels)}
        p = subprocess.run(["bash", str(UP), str(self.dir)], capture_output=True, text=True, env=env, timeout=120)
        if p.returncode != 0:
            log = (self.dir / "pulseaudio.log")
            raise VirtualAudioError(f"virtual-audio-up.sh failed (rc {p.returncode}): {p.stderr.strip()}\n"
                                    + (log.read_text()[-2000:] if log.exists() else ""))
        line = p.stdout.strip().splitlines()[-1]
        for part in line.removeprefix("export ").split():
            k, _, v = part.partition("=")
            self.env[k] = v.strip("'")
        missing = [k for k in _ENV_KEYS if k not in self.env]
        if missing:
            raise VirtualAudioError(f"virtual-audio-up.sh did not export {missing}: {line!r}")
        self.pid = int((self.dir / "run" / "pid").read_text().split()[0])
        return self

    def stop(self) -> None:
        for c in self._children:
            if c.poll() is None:
                c.kill()
                c.wait(2)
        self._children.clear()
        subprocess.run(["bash", str(DOWN), str(self.dir)], capture_output=True, timeout=30)
        self.pid = None

    def kill(self) -> None:
        """SIGKILL the server (the devices vanish at once, as on a crash or an unplug)."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGKILL)
            for _ in range(100):
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                try:
                    os.waitpid(self.pid, os.WNOHANG)  # not our child (daemonized): ignore errors
                except ChildProcessError:
                    pass
                time.sleep(0.01)
            # a stale pid file would make virtual-audio-down.sh signal whatever reuses the PID
            (self.dir / "run" / "pid").unlink(missing_ok=True)
            self.pid = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    # ---- clients --------------------------------------------------------------------------------
    def _spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, env=self.environ(), **kw)
        self._children.append(p)
        return p

    def play_mic(self, wav: Path | str) -> subprocess.Popen[bytes]:
        """Play a WAV into the virtual microphone (real-time pace; returns at once)."""
        return self._spawn(["paplay", "--device=micfeed", "--latency-msec=10", str(wav)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def record(self, source: str = "vspk.monitor", rate: int | None = None, channels: int | None = None) -> "Recorder":
        """Start recording ``source`` (default: the speaker) with a monotonic timeline."""
        return Recorder(self, source, rate or self.rate, channels or 1)


@dataclass
class Recording:
    x: np.ndarray     # float64, PCM16 scale, mono (or frames x channels)
    rate: int
    t0: float         # monotonic instant of sample 0 (arrival timeline, see the module doc)

    def t(self, i: float) -> float:
        return self.t0 + i / self.rate

    def i(self, t: float) -> int:
        return int(round((t - self.t0) * self.rate))

    def segment(self, t_a: float, t_b: float) -> np.ndarray:
        return self.x[max(0, self.i(t_a)): max(0, self.i(t_b))]


class Recorder:
    """``parec`` of a source, raw s16le, chunks stamped with ``time.monotonic()`` on arrival."""

    CHUNK_MS = 5

    def __init__(self, va: VirtualAudio, source: str, rate: int, channels: int) -> None:
        self.rate, self.channels = rate, channels
        self.proc = va._spawn(["parec", f"--device={source}", "--raw", "--format=s16le", f"--rate={rate}",
                               f"--channels={channels}", "--latency-msec=5"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0)
        self._chunks: list[bytes] = []
        self._anchor = float("inf")
        self._n = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        frame = 2 * self.channels
        pending = b""
        while True:
            try:
                b = os.read(fd, 65536)
            except OSError:
                return
            t = time.monotonic()
            if not b:
                return
            b = pending + b
            cut = len(b) - len(b) % frame
            b, pending = b[:cut], b[cut:]
            with self._lock:
                self._chunks.append(b)
                self._n += len(b) // frame
                a = t - self._n / self.rate
                if a < self._anchor:
                    self._anchor = a

    def wait_started(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._n > self.rate // 10:
                    return
            time.sleep(0.01)
        raise VirtualAudioError("the speaker recorder delivered no data")

    def snapshot(self) -> Recording:
        with self._lock:
            data, t0 = b"".join(self._chunks), self._anchor
        x = np.frombuffer(data, "<i2").astype(np.float64)
        if self.channels > 1:
            x = x.reshape(-1, self.channels)
        return Recording(x, self.rate, t0)

    def stop(self) -> Recording:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(2)
        self._thread.join(2)
        return self.snapshot()


# ---- signals -----------------------------------------------------------------------------------

def write_wav(path: Path, x: np.ndarray, rate: int) -> Path:
    """PCM16 WAV; ``x`` in PCM16 scale, mono (n) or frames x channels."""
    x = np.asarray(x)
    x = x if x.ndim == 2 else x[:, None]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.clip(np.round(x), -32768, 32767).astype("<i2").tobytes())
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
        if w.getnchannels() > 1:
            x = x.reshape(-1, w.getnchannels())
        return x, w.getframerate()


def tone(freq: float, seconds: float, rate: int, amp: float = 0.3, fade_s: float = 0.005) -> np.ndarray:
    """A sine in PCM16 scale with short fades (no clicks at the ends)."""
    n = int(round(seconds * rate))
    x = amp * 32767 * np.sin(2 * np.pi * freq * np.arange(n) / rate)
    f = min(int(fade_s * rate), n // 2)
    if f:
        ramp = np.arange(f) / f
        x[:f] *= ramp
        x[n - f:] *= ramp[::-1]
    return x


def synth(text: str, path: Path, *, voice: str = "en-us", speed: int = 150, rate: int = 16000,
          lead_s: float = 0.3, tail_s: float = 0.6) -> Path:
    """Deterministic speech: espeak-ng (deterministic) -> sox without dither (``-D``), padded."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise VirtualAudioError(f"{tool} not found: run `bash .ci/setup` (installs espeak-ng and sox)")
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True,
                   capture_output=True)
    subprocess.run(["sox", "-D", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path),
                    "pad", str(lead_s), str(tail_s), "norm", "-3"], check=True, capture_output=True)
    raw.unlink()
    return path


# ---- analysis ----------------------------------------------------------------------------------

def dominant_hz(x: np.ndarray, rate: int) -> float:
    """Peak of the Hann-windowed spectrum, refined by parabolic interpolation (0.1 % accurate)."""
    x = np.asarray(x, np.float64)
    spec = np.abs(np.fft.rfft((x - x.mean()) * np.hanning(len(x)), 8 * len(x)))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1: k + 2] + 1e-12)
    k = k + 0.5 * (a - c) / (a - 2 * b + c)
    return float(k * rate / (8 * len(x)))


def active_spans(x: np.ndarray, rate: int, threshold: float = 30.0, gap_s: float = 0.05) -> list[tuple[int, int]]:
    """(start, end) sample indices of stretches where |x| > threshold, merging gaps < gap_s."""
    idx = np.flatnonzero(np.abs(x) > threshold)
    if not len(idx):
        return []
    spans = []
    start = prev = int(idx[0])
    gap = int(gap_s * rate)
    for i in idx[1:]:
        i = int(i)
        if i - prev > gap:
            spans.append((start, prev + 1))
            start = i
        prev = i
    spans.append((start, prev + 1))
    return spans


def longest_silence(x: np.ndarray, threshold: float = 0.5) -> int:
    """Longest run of samples with |x| <= threshold (a dropped block inside a signal shows up here)."""
    quiet = np.abs(x) <= threshold
    if not quiet.any():
        return 0
    d = np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return int((ends - starts).max())
