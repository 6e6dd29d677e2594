"""Debug recordings: the last N turns' microphone audio, played audio and events, on one clock.

Opt-in (``[recording] enabled = true``). The recorder keeps the current turn in memory and
writes each finished turn as one directory under ``RecordingConfig.dir``; the directory is
kept to ``keep_turns`` turns and ``max_mb`` megabytes (oldest turns deleted first). See
docs/metrics.md ("Debug recordings") for the layout; :func:`load_recording` reads it back
(``hydrad timeline`` uses it).

Feeding it (all sync, non-blocking, from the trio thread):

* ``recorder.on_capture(t_adc, pcm16k)``: every microphone frame the engine delivers
  (``Daemon.on_capture``, before the gate check: the mic is recorded even while gated);
* ``recorder.on_play(response_id, pcm, rate)``: every response chunk handed to the engine
  (``Daemon._playback_task``, right before ``engine.play``), at the session's output rate;
* ``recorder.on_flush(response_id, t_silent)``: the engine confirmed a flush
  (``Daemon.on_flushed``); optional, the ``barge_in`` event is the fallback;
* ``bus.subscribe(recorder)``: every event, with its ``t``;
* ``nursery.start(recorder.run)``: the writer task (file I/O in a worker thread; without it,
  e.g. in a script, finished turns are written inline); on cancellation it saves the turn in
  progress (``close()`` does the same by hand).

Time. Every timestamp is ``time.monotonic()``: mic frames are placed by their ADC time; a
response's chunks are laid end to end from the engine's first-audible instant (the
``response_audio_started`` event) and cut at the flush's ``t_silent``, so the played track is
what the speaker played as far as the engine's accounting knows (an underrun's gap is not
shown). Chunks of a response that never became audible are not in the played track.

Turn boundaries. A turn's directory starts ``preroll_s`` before the ``speech_started`` that
opens it (a barge-in's ``speech_started`` does not open one: it stays with the response it
cut) and ends at the next turn's start, ``tail_s`` after the last ``response_done`` when
nothing else is going on, or after ``max_segment_s``. A stretch with no events and no loud
microphone audio (the idle room between turns) is not kept.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import structlog
import trio

from ..config import RecordingConfig
from ..events import Event
from .logging import redact_value

log = structlog.get_logger("hydrad.recorder")

FORMAT = "hydrad-recording/1"
MIC_RATE = 16000
SEGMENT_PREFIX = "turn-"
MAX_EVENTS_PER_SEGMENT = 5000
MAX_PENDING_WRITES = 4


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


@dataclass
class _Chunk:
    t: float
    rate: int
    samples: np.ndarray  # int16
    response_id: str | None = None

    @property
    def end(self) -> float:
        return self.t + len(self.samples) / self.rate

    def split(self, t_cut: float) -> tuple["_Chunk | None", "_Chunk | None"]:
        if t_cut <= self.t:
            return None, self
        if t_cut >= self.end:
            return self, None
        n = int(round((t_cut - self.t) * self.rate))
        return (_Chunk(self.t, self.rate, self.samples[:n], self.response_id),
                _Chunk(self.t + n / self.rate, self.rate, self.samples[n:], self.response_id))


@dataclass
class _Segment:
    t_start: float
    mic: list[_Chunk] = field(default_factory=list)
    played: list[_Chunk] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    events_dropped: int = 0
    activity: bool = False  # a turn event happened in it
    awaiting: bool = False  # the user spoke and no response (or discard) came yet
    open_responses: set[str] = field(default_factory=set)
    open_tools: set[str] = field(default_factory=set)
    last_activity_t: float | None = None
    loud_samples: int = 0
    end_reason: str | None = None
    t_end: float | None = None
    session: dict[str, Any] = field(default_factory=dict)  # session_id, session_audio_t0 at the cut

    def empty(self) -> bool:
        return not self.mic and not self.played and not self.events

    def busy(self) -> bool:
        return self.awaiting or bool(self.open_responses) or bool(self.open_tools)


#: events that belong to a turn (they keep a turn's directory open; see _check_cut)
TURN_EVENTS = frozenset({
    "speech_started", "speech_stopped", "user_turn_done", "response_created", "response_audio_started",
    "response_done", "barge_in", "tool_call", "tool_result", "cancel_requested",
})


@dataclass
class _Response:
    rate: int
    pending: list[np.ndarray] = field(default_factory=list)
    t_next: float | None = None
    cut_at: float | None = None
    first_audible: float | None = None


class Recorder:
    def __init__(
        self,
        cfg: RecordingConfig,
        *,
        clock: Any = time.monotonic,
        wall_clock: Any = time.time,
        preroll_s: float = 1.5,
        tail_s: float = 2.0,
        max_segment_s: float = 60.0,
        loud_dbfs: float = -35.0,
        loud_ms: float = 300.0,
    ) -> None:
        self.cfg = cfg
        self.root = Path(cfg.dir)
        self.clock = clock
        self.wall_clock = wall_clock
        self.preroll_s = preroll_s
        self.tail_s = tail_s
        self.max_segment_s = max_segment_s
        self.loud_level = int(32768 * 10 ** (loud_dbfs / 20))
        self.loud_samples = int(MIC_RATE * loud_ms / 1000)
        self.max_bytes = int(cfg.max_mb * 1_000_000)
        self.boot_id = boot_id()
        self.enabled = cfg.enabled
        self.current = _Segment(clock())
        self._responses: collections.OrderedDict[str, _Response] = collections.OrderedDict()
        self._pending: collections.deque[_Segment] = collections.deque()
        self._wakeup: trio.Event | None = None
        self._writer_running = False
        self._seq: int | None = None
        self.session_id: str | None = None
        self.session_audio_t0: float | None = None
        self.output_rate: int | None = None
        self.segments_written = 0
        self.segments_skipped = 0
        self.segments_dropped = 0
        self.write_errors = 0

    # ------------------------------------------------------------------ taps
    def on_capture(self, t_adc: float, pcm16k: bytes) -> None:
        """One microphone frame: 16 kHz mono PCM16, first sample at monotonic ``t_adc``."""
        if not self.enabled or not pcm16k:
            return
        samples = np.frombuffer(pcm16k, dtype="<i2").copy()
        seg = self.current
        seg.mic.append(_Chunk(float(t_adc), MIC_RATE, samples))
        if samples.size:
            seg.loud_samples += int(np.count_nonzero(np.abs(samples.astype(np.int32)) >= self.loud_level))
        self._check_cut(self.clock())

    def on_play(self, response_id: str, pcm: bytes, rate: int) -> None:
        """One response chunk handed to the engine (PCM16 mono at ``rate``)."""
        if not self.enabled or not pcm or not rate:
            return
        r = self._responses.get(response_id)
        if r is None:
            r = self._responses[response_id] = _Response(int(rate))
            while len(self._responses) > 16:
                self._responses.popitem(last=False)
        if r.cut_at is not None:
            return  # flushed: never played
        samples = np.frombuffer(pcm, dtype="<i2").copy()
        if int(rate) != r.rate:
            samples = _resample(samples, int(rate), r.rate)
        if r.t_next is None:
            if sum(len(p) for p in r.pending) < r.rate * 120:  # bounded while it is not audible
                r.pending.append(samples)
            return
        self._place(response_id, r, samples)

    def on_flush(self, response_id: str | None = None, t_silent: float | None = None,
                 dropped_samples: int = 0) -> None:
        """The engine confirmed a flush: nothing played after ``t_silent``."""
        if not self.enabled:
            return
        t = float(t_silent) if t_silent else self.clock()
        for rid, r in self._responses.items():
            if r.t_next is not None and r.cut_at is None and (r.first_audible or t) <= t:
                self._cut_response(rid, r, t)

    # ------------------------------------------------------------------ bus sink
    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        name, f, t = event.name, event.fields, event.t
        seg = self.current
        if name == "speech_started":
            # A new turn starts a new directory; a false start inside a turn does not, and neither
            # does a barge-in: it stays with the response it interrupted.
            if not seg.awaiting and not f.get("during_response"):
                self._cut(max(seg.t_start, t - self.preroll_s), "speech_started")
            self.current.awaiting = True
        elif name == "user_turn_done" and f.get("status") == "discarded":
            seg.awaiting = False
        elif name == "session_connected":
            self.session_id = f.get("session_id")
        elif name == "session_configured":
            self.session_id = f.get("session_id") or self.session_id
            self.output_rate = f.get("output_rate")
            self.session_audio_t0 = t  # the gate opens here: the service's audio_*_ms count from it
        elif name == "session_disconnected":
            seg.awaiting = False
            seg.open_responses.clear()
            seg.open_tools.clear()
        elif name == "response_created":
            seg.awaiting = False
            if f.get("response_id"):
                seg.open_responses.add(str(f["response_id"]))
        elif name == "response_audio_started":
            self._audible(str(f.get("response_id")), f.get("first_audible"))
        elif name == "barge_in":
            rid = str(f.get("response_id"))
            r = self._responses.get(rid)
            if r is not None and r.cut_at is None:
                t_silent = t
                if r.first_audible is not None and isinstance(f.get("heard_s"), (int, float)) and f["heard_s"] > 0:
                    t_silent = min(t, r.first_audible + float(f["heard_s"]))
                self._cut_response(rid, r, t_silent)
        elif name == "response_done":
            seg.open_responses.discard(str(f.get("response_id")))
        elif name == "tool_call" and f.get("call_id"):
            seg.open_tools.add(str(f["call_id"]))
        elif name == "tool_result":
            seg.open_tools.discard(str(f.get("call_id")))
        if name in TURN_EVENTS:
            self.current.activity = True
            self.current.last_activity_t = t
        self._add_event(event)
        self._check_cut(self.clock())

    def _add_event(self, event: Event) -> None:
        seg = self.current
        if len(seg.events) >= MAX_EVENTS_PER_SEGMENT:
            seg.events_dropped += 1
            return
        seg.events.append({"t": event.t, "name": event.name, "fields": redact_value(dict(event.fields))})

    # ------------------------------------------------------------------ played audio
    def _audible(self, response_id: str, first_audible: Any) -> None:
        r = self._responses.get(response_id)
        if r is None:
            r = self._responses[response_id] = _Response(int(self.output_rate or 24000))
        if r.t_next is not None or not isinstance(first_audible, (int, float)):
            return
        r.first_audible = r.t_next = float(first_audible)
        pending, r.pending = r.pending, []
        for samples in pending:
            self._place(response_id, r, samples)

    def _place(self, response_id: str, r: _Response, samples: np.ndarray) -> None:
        assert r.t_next is not None
        chunk = _Chunk(r.t_next, r.rate, samples, response_id)
        r.t_next = chunk.end
        self.current.played.append(chunk)

    def _cut_response(self, response_id: str, r: _Response, t: float) -> None:
        r.cut_at = t
        r.pending = []
        kept: list[_Chunk] = []
        for c in self.current.played:
            if c.response_id == response_id and c.end > t:
                before, _ = c.split(t)
                if before is not None and len(before.samples):
                    kept.append(before)
            else:
                kept.append(c)
        self.current.played = kept

    # ------------------------------------------------------------------ segmentation
    def _check_cut(self, now: float) -> None:
        seg = self.current
        if (seg.activity and not seg.busy() and seg.last_activity_t is not None
                and now - seg.last_activity_t >= self.tail_s):
            self._cut(now, "tail")
        elif now - seg.t_start >= self.max_segment_s:
            self._cut(now, "max_length")

    def _cut(self, t_cut: float, reason: str) -> None:
        """End the current segment at ``t_cut``; what is later moves to the new one."""
        old = self.current
        new = _Segment(t_cut)
        new.open_responses, new.open_tools = set(old.open_responses), set(old.open_tools)
        new.awaiting = old.awaiting and reason == "max_length"
        new.activity = new.busy()
        new.last_activity_t = old.last_activity_t if new.activity else None
        for attr in ("mic", "played"):
            before: list[_Chunk] = []
            after: list[_Chunk] = []
            for c in getattr(old, attr):
                a, b = c.split(t_cut)
                if a is not None:
                    before.append(a)
                if b is not None:
                    after.append(b)
            setattr(old, attr, before)
            setattr(new, attr, after)
        new.events = [e for e in old.events if e["t"] >= t_cut]
        old.events = [e for e in old.events if e["t"] < t_cut]
        if new.mic:
            new.loud_samples = sum(_loud(c.samples, self.loud_level) for c in new.mic)
            old.loud_samples = max(0, old.loud_samples - new.loud_samples)
        old.end_reason, old.t_end = reason, t_cut
        old.session = {"session_id": self.session_id, "session_audio_t0": self.session_audio_t0}
        self.current = new
        if old.events or old.loud_samples >= self.loud_samples:
            self._enqueue(old)
        elif not old.empty():
            self.segments_skipped += 1

    def _enqueue(self, seg: _Segment) -> None:
        if not self._writer_running:  # no writer task (a script, a test): write it now
            self._write_safely(seg)
            return
        if len(self._pending) >= MAX_PENDING_WRITES:
            self._pending.popleft()
            self.segments_dropped += 1
            log.warning("recording_segment_dropped", reason="writer behind")
        self._pending.append(seg)
        if self._wakeup is not None:
            self._wakeup.set()

    # ------------------------------------------------------------------ writing
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task: finished segments to disk in a worker thread; on cancel, the rest."""
        if self.enabled:
            await trio.to_thread.run_sync(self._prepare_root)
        self._writer_running = True
        task_status.started()
        try:
            while True:
                self._wakeup = trio.Event()
                if not self._pending:
                    await self._wakeup.wait()
                while self._pending:
                    seg = self._pending.popleft()
                    await trio.to_thread.run_sync(self._write_safely, seg)
        finally:
            self._wakeup = None
            self._writer_running = False
            self.close()

    def close(self) -> None:
        """Save the current segment (if worth keeping) and write everything pending, synchronously."""
        if not self.enabled:
            return
        if not self.current.empty():
            self._cut(self.clock() + 1e-6 if not self.current.played else
                      max(self.clock(), max(c.end for c in self.current.played)) + 1e-6, "close")
        if self._writer_running:
            return
        while self._pending:
            self._write_safely(self._pending.popleft())

    def _prepare_root(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for p in self.root.glob(".tmp-*"):
                shutil.rmtree(p, ignore_errors=True)
        except OSError as exc:
            self.write_errors += 1
            log.warning("recording_dir_unusable", dir=str(self.root), error=str(exc))

    def _write_safely(self, seg: _Segment) -> None:
        try:
            path = self._write(seg)
            self.segments_written += 1
            self._enforce_bounds(keep=path)
        except OSError as exc:
            self.write_errors += 1
            log.warning("recording_write_failed", dir=str(self.root), error=str(exc))

    def _next_seq(self) -> int:
        if self._seq is None:
            self._seq = max((s for s, _ in list_segments(self.root)), default=0)
        self._seq += 1
        return self._seq

    def _write(self, seg: _Segment) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        seq = self._next_seq()
        name = f"{SEGMENT_PREFIX}{seq:06d}"
        tmp = self.root / f".tmp-{name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        mic = _track(seg.mic)
        played = _track(seg.played)
        events_text = "".join(json.dumps(e, separators=(",", ":"), default=str) + "\n" for e in seg.events)
        budget = self.max_bytes - 64 * 1024
        omitted: list[str] = []
        sizes = {"played": played[2].nbytes if played else 0, "mic": mic[2].nbytes if mic else 0}
        if len(events_text) + sizes["played"] + sizes["mic"] > budget and played:
            played, omitted = None, omitted + ["played"]
        if len(events_text) + sizes["mic"] > budget and mic:
            mic, omitted = None, omitted + ["mic"]
        wall_offset = self.wall_clock() - self.clock()
        t_end = seg.t_end if seg.t_end is not None else self.clock()
        meta: dict[str, Any] = {
            "format": FORMAT, "seq": seq, "boot_id": self.boot_id, "clock": "monotonic",
            "t_start": seg.t_start, "t_end": t_end, "wall_start": seg.t_start + wall_offset,
            "end_reason": seg.end_reason, "session_id": seg.session.get("session_id"),
            "session_audio_t0": seg.session.get("session_audio_t0"),
            "turn_ids": sorted({str(e["fields"].get("item_id")) for e in seg.events
                                if e["name"] == "speech_started" and e["fields"].get("item_id")}),
            "response_ids": sorted({str(e["fields"].get("response_id")) for e in seg.events
                                    if e["name"] == "response_created" and e["fields"].get("response_id")}),
            "events": {"file": "events.jsonl", "count": len(seg.events), "dropped": seg.events_dropped},
            "mic": None, "played": None, "audio_omitted": omitted,
        }
        for key, tr in (("mic", mic), ("played", played)):
            if tr is not None:
                t0, rate, samples = tr
                _write_wav(tmp / f"{key}.wav", rate, samples)
                meta[key] = {"file": f"{key}.wav", "rate": rate, "t0": t0, "samples": int(len(samples))}
        (tmp / "events.jsonl").write_text(events_text, encoding="utf-8")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
        final = self.root / name
        os.replace(tmp, final)
        return final

    def _enforce_bounds(self, keep: Path | None = None) -> None:
        segs = list_segments(self.root)
        sizes = {p: _dir_size(p) for _, p in segs}
        total = sum(sizes.values())
        while segs and (len(segs) > self.cfg.keep_turns or total > self.max_bytes):
            _, oldest = segs.pop(0)
            total -= sizes[oldest]
            shutil.rmtree(oldest, ignore_errors=True)


# ---------------------------------------------------------------------- helpers

def _loud(samples: np.ndarray, level: int) -> int:
    return int(np.count_nonzero(np.abs(samples.astype(np.int32)) >= level)) if samples.size else 0


def _resample(samples: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst or not samples.size:
        return samples
    n = max(1, int(round(len(samples) * dst / src)))
    x = np.linspace(0, len(samples) - 1, n)
    return np.interp(x, np.arange(len(samples)), samples.astype(np.float64)).astype(np.int16)


def _track(chunks: list[_Chunk]) -> tuple[float, int, np.ndarray] | None:
    """Chunks placed by time -> one contiguous track (gaps are silence, overlaps mixed)."""
    chunks = [c for c in chunks if len(c.samples)]
    if not chunks:
        return None
    rates = collections.Counter(c.rate for c in chunks)
    rate = rates.most_common(1)[0][0]
    t0 = min(c.t for c in chunks)
    end = max(c.end for c in chunks)
    n = int(round((end - t0) * rate)) + 1
    acc = np.zeros(n, dtype=np.int32)
    jitter = max(1, int(rate * 0.002))  # frames 2 ms off their neighbour are contiguous
    cursor = -10 ** 9
    for c in sorted(chunks, key=lambda c: c.t):
        s = c.samples if c.rate == rate else _resample(c.samples, c.rate, rate)
        pos = int(round((c.t - t0) * rate))
        if abs(pos - cursor) <= jitter:
            pos = cursor
        pos = max(0, pos)
        stop = min(n, pos + len(s))
        acc[pos:stop] += s[: stop - pos]
        cursor = stop
    last = int(np.max(np.nonzero(acc)[0])) + 1 if np.any(acc) else n
    acc = acc[: max(last, min(n, cursor))]
    return t0, rate, np.clip(acc, -32768, 32767).astype(np.int16)


def _write_wav(path: Path, rate: int, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


def _dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def list_segments(root: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """The turn directories under ``root``, oldest first, as ``(seq, path)``."""
    out = []
    try:
        entries = list(Path(root).iterdir())
    except OSError:
        return []
    for p in entries:
        if p.is_dir() and p.name.startswith(SEGMENT_PREFIX):
            try:
                out.append((int(p.name[len(SEGMENT_PREFIX):]), p))
            except ValueError:
                continue
    return sorted(out)


# ---------------------------------------------------------------------- reading

@dataclass
class Track:
    t0: float
    rate: int
    samples: np.ndarray  # int16

    @property
    def end(self) -> float:
        return self.t0 + len(self.samples) / self.rate


@dataclass
class SegmentData:
    path: Path | None
    meta: dict[str, Any]
    mic: Track | None
    played: Track | None
    events: list[dict[str, Any]]

    @property
    def t_start(self) -> float:
        return float(self.meta.get("t_start", 0.0))

    @property
    def t_end(self) -> float:
        return float(self.meta.get("t_end", self.t_start))


def _read_wav(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: not 16-bit PCM")
        rate, ch = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    if ch > 1:
        data = data.reshape(-1, ch)[:, 0]
    return rate, data


def load_segment(path: str | os.PathLike[str]) -> SegmentData:
    p = Path(path)
    meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
    tracks: dict[str, Track | None] = {"mic": None, "played": None}
    for key in tracks:
        info = meta.get(key)
        if info and (p / info["file"]).exists():
            rate, samples = _read_wav(p / info["file"])
            tracks[key] = Track(float(info["t0"]), rate, samples)
    events: list[dict[str, Any]] = []
    ev_file = p / (meta.get("events") or {}).get("file", "events.jsonl")
    if ev_file.exists():
        for line in ev_file.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return SegmentData(p, meta, tracks["mic"], tracks["played"], events)


def load_recording(path: str | os.PathLike[str], turns: int | None = None) -> list[SegmentData]:
    """A turn directory, or the recording root (its last ``turns`` turns of the latest boot).

    Raises FileNotFoundError / ValueError with a one-line reason when there is nothing to read.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if (p / "meta.json").exists():
        return [load_segment(p)]
    segs = list_segments(p)
    if not segs:
        raise ValueError(f"{p}: not a recording (no meta.json and no {SEGMENT_PREFIX}* directories)")
    loaded = [load_segment(sp) for _, sp in segs[-(turns or 5):]]
    boot = loaded[-1].meta.get("boot_id")
    # Monotonic time restarts at boot: only the latest boot's turns share a time axis.
    same = [s for s in loaded if s.meta.get("boot_id") == boot]
    return same


def events_from(items: Iterable[Any]) -> list[dict[str, Any]]:
    """Event objects or dicts -> the recording's event dicts (``t``, ``name``, ``fields``)."""
    out = []
    for e in items:
        if isinstance(e, Event):
            out.append({"t": e.t, "name": e.name, "fields": dict(e.fields)})
        elif isinstance(e, dict):
            out.append({"t": float(e["t"]), "name": e["name"], "fields": dict(e.get("fields") or {})})
    return out
