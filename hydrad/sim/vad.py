"""Server-side turn detection for the simulator: webrtcvad on 20 ms frames.

Sans-IO: :meth:`TurnDetector.feed` takes PCM16 16 kHz bytes of any length (clients append
10-40 ms or odd sizes; we rechunk to 20 ms, the frame size webrtcvad is most reliable at) and
returns the turn events that audio produced, stamped on the audio clock.

Digital silence gate: webrtcvad keeps flagging frames as speech for a hangover of 3-7
frames (60-140 ms) after speech stops, even when they are exact zeros. That would make a
120 ms blip measure ~240 ms and push every ``speech_stopped`` late by the hangover, so frames
whose RMS is below ``silence_floor_dbfs`` (default -60 dBFS: digital silence, not a room) count
as unvoiced whatever webrtcvad says. Speech detection itself is webrtcvad's alone.

Audio clock (reference §9.12 leaves the origin open): milliseconds of *accepted* audio
appended since ``session.configured``. Appends dropped before configure or rejected as
``invalid_audio`` do not advance it. An audio clock (rather than wall time) makes the stamps
deterministic for a client that paces correctly and lets it map them onto its own capture
timeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import webrtcvad

from hydrad.protocol import constants as C

FRAME_MS = 20
FRAME_BYTES = C.INPUT_RATE * FRAME_MS // 1000 * C.SAMPLE_WIDTH  # 640


@dataclass(frozen=True)
class SpeechStartedEv:
    audio_start_ms: int
    item_id: str


@dataclass(frozen=True)
class SpeechStoppedEv:
    audio_end_ms: int
    item_id: str


@dataclass(frozen=True)
class TurnCompleted:
    """The turn is long enough to answer."""

    item_id: str
    speech_ms: int


@dataclass(frozen=True)
class TurnDiscarded:
    """Speech opened a turn but was too short (a cough, a click): no response."""

    item_id: str
    speech_ms: int


VadEvent = SpeechStartedEv | SpeechStoppedEv | TurnCompleted | TurnDiscarded


class TurnDetector:
    """Onset after ``start_ms`` of consecutive voiced frames, end after ``end_silence_ms`` of
    consecutive unvoiced ones; turns shorter than ``min_speech_ms`` are discarded.

    ``audio_start_ms`` is the start of the first voiced frame of the onset run and
    ``audio_end_ms`` the end of the last voiced frame, so ``end - start`` is the speech length.
    """

    def __init__(
        self,
        new_item_id: Callable[[], str],
        *,
        mode: int = 2,
        start_ms: int = 60,
        end_silence_ms: int = 500,
        min_speech_ms: int = 250,
        silence_floor_dbfs: float | None = -60.0,
    ) -> None:
        self._vad = webrtcvad.Vad(mode)
        self._floor_rms = None if silence_floor_dbfs is None else 32768.0 * 10 ** (silence_floor_dbfs / 20.0)
        self._new_item_id = new_item_id
        self._start_frames = max(1, -(-start_ms // FRAME_MS))
        self._end_frames = max(1, -(-end_silence_ms // FRAME_MS))
        self._min_speech_ms = min_speech_ms
        self._pending = bytearray()
        self._frames = 0  # complete 20 ms frames processed
        self._voiced_run = 0
        self._unvoiced_run = 0
        self._item_id: str | None = None
        self._start_ms = 0
        self._last_voiced_end_ms = 0

    @property
    def audio_ms(self) -> int:
        """The audio clock: ms of audio fed so far (including a partial frame)."""
        return (self._frames * FRAME_BYTES + len(self._pending)) * 1000 // (C.INPUT_RATE * C.SAMPLE_WIDTH)

    @property
    def in_speech(self) -> bool:
        return self._item_id is not None

    def feed(self, pcm: bytes) -> list[VadEvent]:
        self._pending += pcm
        events: list[VadEvent] = []
        while len(self._pending) >= FRAME_BYTES:
            frame = bytes(self._pending[:FRAME_BYTES])
            del self._pending[:FRAME_BYTES]
            voiced = self._voiced(frame)
            self._frames += 1
            end_ms = self._frames * FRAME_MS
            if self._item_id is None:
                self._voiced_run = self._voiced_run + 1 if voiced else 0
                if self._voiced_run >= self._start_frames:
                    self._item_id = self._new_item_id()
                    self._start_ms = end_ms - self._voiced_run * FRAME_MS
                    self._last_voiced_end_ms = end_ms
                    self._unvoiced_run = 0
                    events.append(SpeechStartedEv(self._start_ms, self._item_id))
            else:
                if voiced:
                    self._unvoiced_run = 0
                    self._last_voiced_end_ms = end_ms
                else:
                    self._unvoiced_run += 1
                    if self._unvoiced_run >= self._end_frames:
                        events.extend(self._close_turn())
        return events

    def _voiced(self, frame: bytes) -> bool:
        if self._floor_rms is not None:
            samples = np.frombuffer(frame, dtype="<i2").astype(np.float32)
            if float(np.sqrt(np.mean(samples * samples))) < self._floor_rms:
                return False
        return bool(self._vad.is_speech(frame, C.INPUT_RATE))

    def _close_turn(self) -> list[VadEvent]:
        assert self._item_id is not None
        item_id, self._item_id = self._item_id, None
        self._voiced_run = 0
        speech_ms = self._last_voiced_end_ms - self._start_ms
        stopped = SpeechStoppedEv(self._last_voiced_end_ms, item_id)
        if speech_ms < self._min_speech_ms:
            return [stopped, TurnDiscarded(item_id, speech_ms)]
        return [stopped, TurnCompleted(item_id, speech_ms)]
