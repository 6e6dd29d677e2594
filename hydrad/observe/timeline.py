"""``hydrad timeline RECORDING``: a picture of a debug recording, readable at a glance.

Three lanes on one time axis (seconds; every timestamp of a recording is ``time.monotonic()``):

* **microphone**: the mic waveform; the user's speech as the service's VAD placed it
  (shaded), ``speech_started`` / ``speech_stopped`` arrivals (thin blue lines);
* **turn**: each response as a bar from ``response.created`` to its ``response_done``
  (coloured by status), tool calls as bars with their durations, the latency from the end of
  the user's speech to the first delta (tick) and to the first audible sample (arrow, in ms),
  service errors and other incidents as red markers;
* **speaker**: the played waveform, each response labelled where it became audible.

Barge-ins are red lines through all lanes at the trigger, with the stop time (trigger ->
silence) written next to them. Rendering uses matplotlib's Agg canvas directly (no pyplot,
no global backend switch), so it is safe inside the daemon and in tests.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import wave
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from .recorder import SegmentData, Track, events_from, load_recording

MIC_COLOR = "#1f77b4"
SPEECH_COLOR = "#9ecae1"
PLAY_COLOR = "#2ca02c"
END_SPEECH_COLOR = "#08519c"
AUDIBLE_COLOR = "#238b45"
BARGE_COLOR = "#d62728"
TOOL_COLOR = "#9467bd"
STATUS_COLORS = {"completed": "#74c476", "cancelled": "#fd8d3c", "failed": "#d62728", "incomplete": "#969696"}
INCIDENTS = ("service_error", "malformed_frame", "session_disconnected", "service_warning")


def _short(rid: Any) -> str:
    s = str(rid or "?")
    return s if len(s) <= 10 else "…" + s[-6:]


def _envelope(track: Track, t_ref: float, px_per_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max per horizontal pixel: a long recording draws as fast as a short one."""
    a = track.samples.astype(np.float32) / 32768.0
    if a.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    step = max(1, int(track.rate / max(px_per_s, 1.0)))
    n = int(math.ceil(a.size / step))
    pad = n * step - a.size
    if pad:
        a = np.concatenate([a, np.zeros(pad, dtype=np.float32)])
    blocks = a.reshape(n, step)
    x = track.t0 - t_ref + np.arange(n) * step / track.rate
    return x, blocks.min(axis=1), blocks.max(axis=1)


class _Timeline:
    def __init__(self, segments: Sequence[SegmentData], events: list[dict[str, Any]], title: str | None) -> None:
        self.segments = list(segments)
        self.events = sorted(events, key=lambda e: e["t"])
        self.title = title
        times: list[float] = [e["t"] for e in self.events]
        for s in self.segments:
            for tr in (s.mic, s.played):
                if tr is not None:
                    times += [tr.t0, tr.end]
            if s.meta.get("t_start") is not None:
                times.append(s.t_start)
        if not times:
            raise ValueError("nothing to draw: no audio and no events")
        self.t_ref = min(times)
        self.t_last = max(max(times), self.t_ref + 1.0)
        self.audio_t0 = next((s.meta.get("session_audio_t0") for s in reversed(self.segments)
                              if s.meta.get("session_audio_t0") is not None), None)
        for e in self.events:
            if e["name"] == "session_configured":
                self.audio_t0 = e["t"]

    def x(self, t: float) -> float:
        return t - self.t_ref

    # ------------------------------------------------------------------ figure
    def render(self, out: Path, width_in: float = 16.0) -> Path:
        span = self.t_last - self.t_ref
        fig = Figure(figsize=(width_in, 8.0), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        gs = fig.add_gridspec(3, 1, height_ratios=[3, 2.2, 3])
        ax_mic = fig.add_subplot(gs[0])
        ax_turn = fig.add_subplot(gs[1], sharex=ax_mic)
        ax_play = fig.add_subplot(gs[2], sharex=ax_mic)
        px_per_s = (width_in * 110 * 1.5) / max(span, 0.5)
        self._waves(ax_mic, [s.mic for s in self.segments], MIC_COLOR, px_per_s, "microphone")
        self._waves(ax_play, [s.played for s in self.segments], PLAY_COLOR, px_per_s, "speaker (played)")
        self._speech(ax_mic)
        summary = self._turns(ax_turn, ax_mic, ax_play)
        self._segment_marks(ax_mic)
        for ax in (ax_mic, ax_turn, ax_play):
            ax.grid(axis="x", color="#dddddd", linewidth=0.6)
            ax.set_axisbelow(True)
        margin = max(0.2, span * 0.01)
        ax_mic.set_xlim(-margin, span + margin)
        ax_play.set_xlabel(self._xlabel(), fontsize=10)
        for ax in (ax_mic, ax_turn):
            ax.tick_params(labelbottom=False)
        fig.suptitle(self._title(), fontsize=12, fontweight="bold", x=0.01, ha="left")
        ax_mic.set_title(summary, fontsize=10, loc="left", color="#333333")
        fig.legend(handles=self._legend(), loc="outside lower center", ncol=9, fontsize=9, frameon=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
        return out

    def _title(self) -> str:
        if self.title:
            return self.title
        seg = self.segments[-1] if self.segments else None
        parts = ["hydrad timeline"]
        if seg is not None and seg.path is not None:
            parts.append(str(seg.path.parent.name + "/" + seg.path.name) if len(self.segments) == 1
                         else f"{seg.path.parent.name}: {len(self.segments)} turns")
        sid = next((s.meta.get("session_id") for s in self.segments if s.meta.get("session_id")), None)
        if sid:
            parts.append(f"session {sid}")
        return " · ".join(parts)

    def _xlabel(self) -> str:
        wall = next((s.meta.get("wall_start") - (s.t_start - self.t_ref) for s in self.segments
                     if isinstance(s.meta.get("wall_start"), (int, float))), None)
        if wall is None:
            return "time (s)"
        return "time (s) since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))

    def _waves(self, ax: Any, tracks: Iterable[Track | None], color: str, px_per_s: float, label: str) -> None:
        drawn = False
        for tr in tracks:
            if tr is None or tr.samples.size == 0:
                continue
            x, lo, hi = _envelope(tr, self.t_ref, px_per_s)
            ax.fill_between(x, lo, hi, step="post", color=color, linewidth=0, alpha=0.9)
            drawn = True
        ax.set_ylim(-1.05, 1.05)
        ax.set_yticks([-1, 0, 1])
        ax.set_ylabel(label, fontsize=10)
        ax.axhline(0, color="#999999", linewidth=0.4)
        if not drawn:
            ax.text(0.5, 0.5, "no audio recorded", transform=ax.transAxes, ha="center", va="center",
                    color="#777777", fontsize=11)

    def _speech(self, ax: Any) -> None:
        """User speech as the service's VAD saw it, and the arrival of its events."""
        starts: dict[str, dict[str, Any]] = {}
        for e in self.events:
            f = e["fields"]
            if e["name"] == "speech_started":
                starts[str(f.get("item_id"))] = e
                ax.axvline(self.x(e["t"]), color=END_SPEECH_COLOR, linewidth=0.8, linestyle=":")
            elif e["name"] == "speech_stopped":
                st = starts.pop(str(f.get("item_id")), None)
                ax.axvline(self.x(e["t"]), color=END_SPEECH_COLOR, linewidth=1.2, linestyle="--")
                a, b = self._speech_span(st, e)
                if a is not None and b is not None:
                    ax.axvspan(self.x(a), self.x(b), color=SPEECH_COLOR, alpha=0.45, linewidth=0)
                    ax.text(self.x(a), 0.98, " user", transform=ax.get_xaxis_transform(), va="top",
                            fontsize=9, color=END_SPEECH_COLOR)
                    if e["t"] - b >= 0.05:  # how long the VAD took to call the end of speech
                        ax.annotate("", xy=(self.x(e["t"]), 0.80), xytext=(self.x(b), 0.80),
                                    xycoords=ax.get_xaxis_transform(),
                                    arrowprops={"arrowstyle": "-|>", "color": END_SPEECH_COLOR, "linewidth": 1,
                                                "shrinkA": 0, "shrinkB": 0})
                        ax.text((self.x(b) + self.x(e["t"])) / 2, 0.83, f"VAD {1000 * (e['t'] - b):.0f} ms",
                                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8,
                                color=END_SPEECH_COLOR)
        for st in starts.values():  # still speaking at the end of the recording
            a = self._audio_time(st["fields"].get("audio_start_ms"), st["t"]) or st["t"]
            ax.axvspan(self.x(a), self.x(self.t_last), color=SPEECH_COLOR, alpha=0.45, linewidth=0)

    def _audio_time(self, ms: Any, arrival: float) -> float | None:
        """The service's audio clock (ms of uplink audio) -> monotonic, if it is plausible."""
        if self.audio_t0 is None or not isinstance(ms, (int, float)):
            return None
        t = self.audio_t0 + ms / 1000
        return t if arrival - 5.0 <= t <= arrival + 0.05 else None

    def _speech_span(self, st: dict[str, Any] | None, sp: dict[str, Any]) -> tuple[float | None, float | None]:
        end = self._audio_time(sp["fields"].get("audio_end_ms"), sp["t"])
        start = self._audio_time(st["fields"].get("audio_start_ms"), st["t"]) if st else None
        if start is None or end is None:
            return (st["t"] if st else None), sp["t"]  # arrival times: the best we have
        return start, end

    def _turns(self, ax: Any, ax_mic: Any, ax_play: Any) -> str:
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_ylabel("turn", fontsize=10)
        created: dict[str, float] = {}
        tool_start: dict[str, dict[str, Any]] = {}
        last_stop: float | None = None
        n_resp = n_barge = n_user = 0
        latencies: list[str] = []
        level = 0
        for e in self.events:
            name, f, t = e["name"], e["fields"], e["t"]
            if name == "speech_stopped":
                last_stop = t
            elif name == "user_turn_done":
                n_user += f.get("status") == "completed"
                if f.get("status") == "discarded":
                    ax.text(self.x(t), 0.05, "discarded", fontsize=8, color="#777777", rotation=90, va="bottom")
            elif name == "response_created":
                created[str(f.get("response_id"))] = t
            elif name == "response_done":
                rid = str(f.get("response_id"))
                t0 = created.pop(rid, None)
                n_resp += 1
                status = str(f.get("status"))
                y = 0.80 - 0.14 * (level % 2)
                level += 1
                x0 = self.x(t0) if t0 is not None else self.x(self.t_ref)
                ax.broken_barh([(x0, max(self.x(t) - x0, 0.01))], (y - 0.05, 0.10),
                               facecolors=STATUS_COLORS.get(status, "#bbbbbb"), edgecolor="#555555", linewidth=0.5)
                m = f.get("metrics") or {}
                label = f"{_short(rid)} {status}" + (f" ({f['reason']})" if f.get("reason") else "")
                if m.get("barge_in_trigger"):
                    label += f", cut ({m['barge_in_trigger']})"
                ax.text(x0, y + 0.065, label, fontsize=8, va="bottom", clip_on=True)
                d = m.get("end_of_speech_to_first_delta_ms")
                base = last_stop
                if isinstance(d, (int, float)) and base is not None:
                    ax.plot([self.x(base + d / 1000)] * 2, [0.18, 0.30], color="#555555", linewidth=1.2)
                    ax.text(self.x(base + d / 1000), 0.31, f"1st delta {d:.0f}", fontsize=7, color="#555555",
                            ha="center", va="bottom")
            elif name == "response_audio_started":
                fa = f.get("first_audible")
                lat = f.get("latency_ms")
                if isinstance(fa, (int, float)):
                    for a in (ax_mic, ax, ax_play):
                        a.axvline(self.x(fa), color=AUDIBLE_COLOR, linewidth=1.2)
                    ax_play.text(self.x(fa), 0.97, f" {_short(f.get('response_id'))}", transform=ax_play.get_xaxis_transform(),
                                 va="top", fontsize=8, color=AUDIBLE_COLOR)
                    if isinstance(lat, (int, float)):
                        start = fa - lat / 1000
                        ax.annotate("", xy=(self.x(fa), 0.12), xytext=(self.x(start), 0.12),
                                    arrowprops={"arrowstyle": "<|-|>", "color": AUDIBLE_COLOR, "linewidth": 1.4,
                                                "shrinkA": 0, "shrinkB": 0})
                        ax.text((self.x(fa) + self.x(start)) / 2, 0.14, f"{lat:.0f} ms to audible",
                                ha="center", va="bottom", fontsize=9, fontweight="bold", color=AUDIBLE_COLOR)
                        latencies.append(f"{lat:.0f}")
            elif name == "barge_in":
                n_barge += 1
                stop = f.get("stop_ms")
                trig = t - stop / 1000 if isinstance(stop, (int, float)) else t
                for a in (ax_mic, ax, ax_play):
                    a.axvline(self.x(trig), color=BARGE_COLOR, linewidth=2.0)
                    if isinstance(stop, (int, float)) and stop > 0:
                        a.axvspan(self.x(trig), self.x(t), color=BARGE_COLOR, alpha=0.15, linewidth=0)
                label = f"barge-in ({f.get('trigger')})"
                if isinstance(stop, (int, float)):
                    label += f"\nstop {stop:.0f} ms"
                if isinstance(f.get("heard_s"), (int, float)):
                    label += f", heard {f['heard_s']:.2f} s"
                ax_play.text(self.x(trig), 0.03, " " + label, transform=ax_play.get_xaxis_transform(),
                             color=BARGE_COLOR, fontsize=9, fontweight="bold", va="bottom")
            elif name == "tool_call":
                tool_start[str(f.get("call_id"))] = e
            elif name == "tool_result":
                st = tool_start.pop(str(f.get("call_id")), None)
                dur = f.get("duration_ms")
                t0 = st["t"] if st else (t - dur / 1000 if isinstance(dur, (int, float)) else t)
                tool = st["fields"].get("name") if st else "tool"
                ax.broken_barh([(self.x(t0), max(self.x(t) - self.x(t0), 0.01))], (0.40, 0.10),
                               facecolors=TOOL_COLOR, edgecolor="#3f007d", linewidth=0.5)
                txt = f"{tool} {dur:.0f} ms" if isinstance(dur, (int, float)) else str(tool)
                if f.get("error"):
                    txt += " (error)"
                ax.text(self.x(t0), 0.515, txt, fontsize=8, color=TOOL_COLOR, va="bottom")
            elif name in INCIDENTS:
                code = f.get("code") or f.get("kind") or f.get("reason") or ""
                ax.plot([self.x(t)], [0.93], marker="x", color=BARGE_COLOR, markersize=8, mew=2)
                ax.text(self.x(t), 0.90, f" {name.replace('_', ' ')} {code}", fontsize=8, color=BARGE_COLOR,
                        va="top", clip_on=True)
            elif name == "cancel_requested":
                ax.plot([self.x(t)], [0.93], marker="v", color="#e6550d", markersize=7)
                ax.text(self.x(t), 0.90, f" cancel ({f.get('source')})", fontsize=8, color="#e6550d", va="top")
        for rid, t0 in created.items():  # not done by the end of the recording
            ax.broken_barh([(self.x(t0), self.x(self.t_last) - self.x(t0))], (0.75, 0.10),
                           facecolors="#dddddd", edgecolor="#555555", linewidth=0.5, linestyle="--")
            ax.text(self.x(t0), 0.865, f"{_short(rid)} (open)", fontsize=8, va="bottom")
        parts = [f"{n_user} user turn{'s' * (n_user != 1)}", f"{n_resp} response{'s' * (n_resp != 1)}",
                 f"{n_barge} barge-in{'s' * (n_barge != 1)}"]
        if latencies:
            parts.append("end of speech → audible: " + ", ".join(latencies) + " ms")
        return " · ".join(parts)

    def _segment_marks(self, ax: Any) -> None:
        if len(self.segments) < 2:
            return
        for s in self.segments[1:]:
            ax.axvline(self.x(s.t_start), color="#888888", linewidth=0.8, linestyle=(0, (6, 4)))
            if s.path is not None:
                ax.text(self.x(s.t_start), -0.98, " " + s.path.name, fontsize=7, color="#666666", va="bottom")

    @staticmethod
    def _legend() -> list[Any]:
        return [
            Patch(color=MIC_COLOR, label="microphone"),
            Patch(color=SPEECH_COLOR, label="user speech (VAD)"),
            Line2D([], [], color=END_SPEECH_COLOR, linestyle="--", label="end of speech (speech_stopped)"),
            Line2D([], [], color=AUDIBLE_COLOR, linewidth=1.4, label="first audible"),
            Patch(color=PLAY_COLOR, label="speaker"),
            Patch(color=STATUS_COLORS["completed"], label="response (created → done)"),
            Patch(color=TOOL_COLOR, label="tool call"),
            Line2D([], [], color=BARGE_COLOR, linewidth=2, label="barge-in → silence"),
            Line2D([], [], color=BARGE_COLOR, marker="x", linestyle="", label="error"),
        ]


def render_timeline(
    recording: str | os.PathLike[str] | Sequence[Any],
    out_png: str | os.PathLike[str],
    *,
    turns: int | None = None,
    title: str | None = None,
    width_in: float = 16.0,
) -> Path:
    """Render ``recording`` to ``out_png`` and return its path.

    ``recording``: a turn directory, a recording root (its last ``turns`` turns, default 5),
    a list of :class:`~hydrad.observe.recorder.SegmentData`, or a list of events
    (``Event`` objects or ``{"t", "name", "fields"}`` dicts: no waveforms then).
    """
    if isinstance(recording, (str, os.PathLike)):
        segments = load_recording(recording, turns)
        events = [e for s in segments for e in s.events]
    else:
        items = list(recording)
        if items and all(isinstance(i, SegmentData) for i in items):
            segments, events = items, [e for s in items for e in s.events]
        else:
            segments, events = [], events_from(items)
    return _Timeline(segments, events, title).render(Path(out_png), width_in)


def timeline_main(argv: list[str]) -> int:
    """``hydrad timeline RECORDING [-o out.png] [--turns N]``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="hydrad timeline",
        description="Render a debug recording (a turn directory, or the recording directory: its last turns) "
                    "as a PNG timeline: both waveforms, the turn events, barge-ins and latencies.")
    parser.add_argument("recording", help="a recording turn directory (turn-NNNNNN) or the recording directory")
    parser.add_argument("-o", "--output", help="PNG to write (default: timeline-<name>.png in the current directory)")
    parser.add_argument("--turns", type=int, default=5, help="with the recording directory: how many of the last turns (default 5)")
    parser.add_argument("--title", help="title of the picture")
    args = parser.parse_args(argv)
    src = Path(args.recording)
    out = Path(args.output) if args.output else Path(f"timeline-{src.resolve().name or 'recording'}.png")
    try:
        path = render_timeline(src, out, turns=max(1, args.turns), title=args.title)
    except (OSError, ValueError, KeyError, TypeError, EOFError, wave.Error) as exc:
        print(f"hydrad timeline: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
