"""Debug recordings: what is kept, on which clock, and within which bounds."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import trio

from hydrad.config import RecordingConfig
from hydrad.events import Event, EventBus
from hydrad.observe.recorder import Recorder, list_segments, load_recording, load_segment
from hydrad.observe.scripted import FakeClock, ScriptedConversation, speech_like

FRAME = 320  # 20 ms at 16 kHz


def recorder(tmp_path: Path, clock: FakeClock, **cfg) -> Recorder:
    c = RecordingConfig(enabled=True, dir=str(tmp_path / "rec"), **{"keep_turns": 20, "max_mb": 50.0, **cfg})
    return Recorder(c, clock=clock)


def feed_mic(rec: Recorder, clock: FakeClock, seconds: float, loud: bool = False) -> None:
    audio = speech_like(seconds, 16000, 140.0) if loud else np.zeros(int(seconds * 16000), np.int16)
    for i in range(0, len(audio) - FRAME + 1, FRAME):
        rec.on_capture(clock.t, audio[i:i + FRAME].astype("<i2").tobytes())
        clock.t = round(clock.t + 0.02, 6)


def one_turn(rec: Recorder, clock: FakeClock, i: int, *, reply_s: float = 1.0, rate: int = 24000) -> None:
    feed_mic(rec, clock, 1.0)
    rec(Event("speech_started", {"item_id": f"item_{i}", "audio_start_ms": 0, "during_response": False}, clock.t))
    feed_mic(rec, clock, 1.0, loud=True)
    rec(Event("speech_stopped", {"item_id": f"item_{i}", "audio_end_ms": 0}, clock.t))
    rec(Event("user_turn_done", {"item_id": f"item_{i}", "status": "completed"}, clock.t))
    rec(Event("response_created", {"response_id": f"resp_{i}"}, clock.t))
    pcm = speech_like(reply_s, rate, 220.0).astype("<i2").tobytes()
    half = len(pcm) // 4 * 2
    rec.on_play(f"resp_{i}", pcm[:half], rate)  # before it is audible: held back
    rec(Event("response_audio_started", {"response_id": f"resp_{i}", "first_audible": clock.t + 0.1,
                                         "latency_ms": 100.0}, clock.t + 0.1))
    rec.on_play(f"resp_{i}", pcm[half:], rate)
    feed_mic(rec, clock, reply_s + 0.2)
    rec(Event("response_done", {"response_id": f"resp_{i}", "status": "completed", "reason": None, "metrics": {}},
              clock.t))
    feed_mic(rec, clock, 2.5)  # the tail: the turn is written after tail_s of quiet


def read_wav(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path)) as w:
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")


def test_scripted_conversation_is_recorded_on_one_clock(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    rec = recorder(tmp_path, clock)
    bus = EventBus()
    bus.subscribe(rec)
    sc = ScriptedConversation(bus, rec, clock=clock)
    sc.run()
    rec.close()
    segs = [load_segment(p) for _, p in list_segments(rec.root)]
    assert [s.path.name for s in segs] == ["turn-000001", "turn-000002"]
    first, second = segs
    # turn 1: the session start and the first exchange; mic from the start, resp_1 played from first-audible
    assert first.meta["turn_ids"] == ["item_u1"] and first.meta["response_ids"] == ["resp_1"]
    assert first.mic.rate == 16000 and first.mic.t0 == pytest.approx(1000.0)
    audible = next(e for e in sc.events if e.name == "response_audio_started").fields["first_audible"]
    assert first.played.rate == 24000 and first.played.t0 == pytest.approx(audible)
    assert len(first.played.samples) == pytest.approx(2.0 * 24000, abs=2)
    # the user's speech is where the script put it (1.0-2.2 s): loud there, quiet before
    mic = first.mic.samples.astype(float)
    assert np.abs(mic[int(0.5 * 16000):int(0.9 * 16000)]).max() < 1000
    assert np.abs(mic[int(1.2 * 16000):int(2.0 * 16000)]).max() > 5000
    # turn 2 (with the tool call and the barge-in) starts preroll_s before its speech_started
    assert second.t_start == pytest.approx(1000.0 + 6.8 - rec.preroll_s)
    assert second.meta["turn_ids"] == ["item_u2", "item_u3"]  # the barge-in stays with the reply it cut
    assert second.meta["response_ids"] == ["resp_2", "resp_3"]
    barge = next(e for e in sc.events if e.name == "barge_in")
    # the played track stops where the engine went silent (flush), not where the reply would have ended
    assert second.played.end == pytest.approx(barge.fields["heard_s"] + second.played.t0, abs=0.01)
    assert len(second.played.samples) / 24000 < 2.0  # a 4 s reply, cut after ~1.7 s
    # events: every line JSON, times monotonic, within the directory's span, in order
    names = [e["name"] for e in second.events]
    assert names.index("speech_started") < names.index("barge_in") < names.index("response_done", names.index("barge_in"))
    ts = [e["t"] for e in second.events]
    assert ts == sorted(ts) and second.t_start <= ts[0] and ts[-1] <= second.t_end
    for line in (second.path / "events.jsonl").read_text().splitlines():
        json.loads(line)
    # the two directories tile the time axis
    assert first.t_end == pytest.approx(second.t_start)


def test_keeps_at_most_keep_turns_newest_first(tmp_path: Path) -> None:
    clock = FakeClock(50.0)
    rec = recorder(tmp_path, clock, keep_turns=3)
    for i in range(1, 9):
        one_turn(rec, clock, i)
        assert len(list_segments(rec.root)) <= 3
    segs = [load_segment(p) for _, p in list_segments(rec.root)]
    assert [s.meta["turn_ids"] for s in segs] == [["item_6"], ["item_7"], ["item_8"]]
    assert [s.meta["seq"] for s in segs] == [6, 7, 8]
    assert rec.segments_written == 8


def test_stays_under_its_size_bound(tmp_path: Path) -> None:
    clock = FakeClock(50.0)
    rec = recorder(tmp_path, clock, keep_turns=100, max_mb=0.6)

    def du() -> int:
        return sum(f.stat().st_size for f in rec.root.rglob("*") if f.is_file())

    for i in range(1, 7):
        one_turn(rec, clock, i, reply_s=3.0, rate=48000)  # ~290 KB of played audio + ~190 KB of mic per turn
        assert du() <= 0.6 * 1_000_000
    kept = list_segments(rec.root)
    assert 1 <= len(kept) < 6 and kept[-1][0] == 6
    # A turn bigger than the whole budget is kept without its audio rather than not at all.
    one_turn(rec, clock, 7, reply_s=12.0, rate=48000)
    last = load_segment(list_segments(rec.root)[-1][1])
    assert last.meta["turn_ids"] == ["item_7"] and "played" in last.meta["audio_omitted"] and last.played is None
    assert du() <= 0.6 * 1_000_000


def test_idle_room_is_not_kept_but_unanswered_speech_is(tmp_path: Path) -> None:
    clock = FakeClock(50.0)
    rec = recorder(tmp_path, clock)
    feed_mic(rec, clock, 130.0)  # two minutes of silence, no events
    assert list_segments(rec.root) == [] and rec.segments_skipped >= 2
    feed_mic(rec, clock, 2.0, loud=True)  # somebody spoke; the service never reacted
    feed_mic(rec, clock, 60.0)
    segs = list_segments(rec.root)
    assert len(segs) == 1
    s = load_segment(segs[0][1])
    assert s.meta["end_reason"] == "max_length" and s.events == [] and np.abs(s.mic.samples).max() > 5000


def test_secrets_in_event_fields_are_redacted(tmp_path: Path) -> None:
    clock = FakeClock(50.0)
    rec = recorder(tmp_path, clock)
    rec(Event("session_connected", {"session_id": "s", "url": "wss://h/x?api_key=sekrit-value-1234"}, clock.t))
    feed_mic(rec, clock, 0.2)
    rec.close()
    text = (list_segments(rec.root)[0][1] / "events.jsonl").read_text()
    assert "sekrit-value-1234" not in text and "api_key=[redacted]" in text


def test_disabled_recorder_writes_nothing(tmp_path: Path) -> None:
    clock = FakeClock(50.0)
    rec = Recorder(RecordingConfig(enabled=False, dir=str(tmp_path / "rec")), clock=clock)
    one_turn(rec, clock, 1)
    rec.close()
    assert not (tmp_path / "rec").exists()


async def test_writer_task_writes_in_the_background_and_flushes_on_cancel(tmp_path: Path) -> None:
    clock = FakeClock(50.0)
    rec = recorder(tmp_path, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        one_turn(rec, clock, 1)  # cut by its tail: handed to the writer, not written inline
        assert rec.segments_written == 0
        with trio.fail_after(5):
            while rec.segments_written < 1:
                await trio.sleep(0.01)
        feed_mic(rec, clock, 1.0)
        rec(Event("speech_started", {"item_id": "item_2", "during_response": False}, clock.t))
        feed_mic(rec, clock, 0.5, loud=True)
        nursery.cancel_scope.cancel()  # shutdown: the turn in progress is saved too
    assert [load_segment(p).meta["turn_ids"] for _, p in list_segments(rec.root)] == [["item_1"], ["item_2"]]
    assert not list(rec.root.glob(".tmp-*"))


def test_load_recording_root_and_bad_paths(tmp_path: Path) -> None:
    clock = FakeClock(50.0)
    rec = recorder(tmp_path, clock)
    for i in range(1, 5):
        one_turn(rec, clock, i)
    assert [s.meta["seq"] for s in load_recording(rec.root, turns=2)] == [3, 4]
    assert len(load_recording(rec.root / "turn-000001")) == 1
    with pytest.raises(FileNotFoundError):
        load_recording(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        load_recording(tmp_path / "empty")


def test_without_the_flush_tap_the_barge_in_event_cuts_the_played_track(tmp_path: Path) -> None:
    class NoFlushTap(Recorder):
        def on_flush(self, *args, **kwargs) -> None:  # the daemon did not wire it
            pass

    clock = FakeClock(1000.0)
    rec = NoFlushTap(RecordingConfig(enabled=True, dir=str(tmp_path / "rec")), clock=clock)
    bus = EventBus()
    bus.subscribe(rec)
    sc = ScriptedConversation(bus, rec, clock=clock)
    sc.run()
    rec.close()
    second = load_segment(list_segments(rec.root)[-1][1])
    barge = next(e for e in sc.events if e.name == "barge_in")
    assert second.played.end == pytest.approx(second.played.t0 + barge.fields["heard_s"], abs=0.01)
