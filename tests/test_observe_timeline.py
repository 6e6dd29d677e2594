"""Timeline pictures of recordings: a valid PNG of sane size, with the barge-in and latencies on it."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from hydrad.config import RecordingConfig
from hydrad.events import EventBus
from hydrad.observe.recorder import Recorder, list_segments
from hydrad.observe.scripted import FakeClock, ScriptedConversation
from hydrad.observe.timeline import BARGE_COLOR, render_timeline, timeline_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def color_pixels(path: Path, hex_color: str, tol: float = 0.06) -> int:
    """Pixels of that colour in the plot area (the legend, at the bottom, is left out)."""
    img = imread(str(path))[..., :3]
    img = img[: int(img.shape[0] * 0.93)]
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int(np.count_nonzero(np.all(np.abs(img - rgb) < tol, axis=-1)))


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("recording") / "rec"
    clock = FakeClock(1000.0)
    rec = Recorder(RecordingConfig(enabled=True, dir=str(root)), clock=clock)
    bus = EventBus()
    bus.subscribe(rec)
    sc = ScriptedConversation(bus, rec, clock=clock, echo=0.15)
    sc.run()
    rec.close()
    return root, sc.events


def test_renders_a_png_of_a_recording(recording, tmp_path: Path) -> None:
    root, _ = recording
    out = render_timeline(root, tmp_path / "all.png")
    w, h = png_size(out)
    assert 1200 <= w <= 4000 and 600 <= h <= 2000
    assert 30_000 < out.stat().st_size < 5_000_000  # something was drawn, and not absurdly much
    assert color_pixels(out, BARGE_COLOR) > 1000  # the barge-in is marked: lines through all three lanes


def test_a_turn_without_a_barge_in_has_no_barge_in_marks(recording, tmp_path: Path) -> None:
    root, _ = recording
    first = list_segments(root)[0][1]
    out = render_timeline(first, tmp_path / "turn1.png")
    png_size(out)
    assert color_pixels(out, BARGE_COLOR) == 0


def test_renders_from_events_alone(recording, tmp_path: Path) -> None:
    _, events = recording
    out = render_timeline(events, tmp_path / "events.png", title="events only")
    w, h = png_size(out)
    assert w > 1000 and h > 500


def test_nothing_to_draw_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        render_timeline([], tmp_path / "x.png")


def test_timeline_main(recording, tmp_path: Path, capsys, monkeypatch) -> None:
    root, _ = recording
    out = tmp_path / "cli.png"
    assert timeline_main([str(root), "-o", str(out), "--turns", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    png_size(out)
    monkeypatch.chdir(tmp_path)
    turn = list_segments(root)[-1][1]
    assert timeline_main([str(turn)]) == 0
    assert (tmp_path / f"timeline-{turn.name}.png").exists()
    assert timeline_main([str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("hydrad timeline: ") and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert timeline_main([str(tmp_path / "empty")]) == 1


def test_a_damaged_recording_is_a_one_line_error(recording, tmp_path: Path, capsys) -> None:
    import shutil

    root, _ = recording
    broken = tmp_path / "broken"
    shutil.copytree(list_segments(root)[0][1], broken)
    (broken / "mic.wav").write_bytes(b"RIFF\x00\x00")  # truncated
    assert timeline_main([str(broken), "-o", str(tmp_path / "b.png")]) == 1
    (broken / "meta.json").write_text("{not json")
    assert timeline_main([str(broken), "-o", str(tmp_path / "b.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("hydrad timeline: ") for line in err)
