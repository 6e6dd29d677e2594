"""The residual echo gate's rules (``hydrad.engine.echo_gate``) and the echo path's coupling
(``hydrad.engine.echo_coupling``) on numbers alone: no AEC3, no audio.

Energies are sums of squares over a 10 ms frame at PCM16 scale; ``E(dbfs)`` makes one.
"""

from __future__ import annotations

import numpy as np
import pytest

from hydrad.engine.echo_coupling import EchoCoupling
from hydrad.engine.echo_gate import FRAME, Frame, Verdict, decide, double_talk, keeps, leaks

GATE = 10.0 ** (15.0 / 10.0)  # gate_db 15


def E(dbfs: float) -> float:
    return FRAME * (32768.0 * 10.0 ** (dbfs / 20.0)) ** 2


def rest_of(dbfs: float) -> np.ndarray:
    """A 20 ms rest at a level (a constant signal: only its energy matters to the rules)."""
    return np.full(2 * FRAME, 32768.0 * 10.0 ** (dbfs / 20.0))


def counted(e_in: float, e_out: float, *, rest: float | None = None, ceiling: float = -120.0,
            rest_ceiling: float = -120.0, known: bool = True, recent: float | None = None,
            ) -> tuple[Frame, list[int]]:
    """A frame, and the list its fit appends to each time it runs."""
    calls: list[int] = []

    def fit() -> np.ndarray:
        calls.append(1)
        return rest_of(rest if rest is not None else -120.0)

    return Frame(E(e_in), E(recent if recent is not None else e_in), E(e_out),
                 fit if rest is not None else None, None, E(ceiling), E(rest_ceiling), known), calls


def frame(e_in: float, e_out: float, **kw: object) -> Frame:
    return counted(e_in, e_out, **kw)[0]  # type: ignore[arg-type]


def test_verdict_properties():
    assert {v for v in Verdict if v.muted} == {Verdict.LEAK, Verdict.RESIDUAL}
    assert {v for v in Verdict if v.kept} == {Verdict.KEEP_MIC, Verdict.KEEP_REST}
    assert {v for v in Verdict if v.opens} == {Verdict.NEAR, Verdict.KEEP_MIC, Verdict.KEEP_REST}


def test_residual_echo_is_muted_and_a_passed_frame_passes():
    assert decide(frame(-30, -60, rest=-80), GATE, held=False) is Verdict.RESIDUAL  # 30 dB out
    assert decide(frame(-30, -40, rest=-80), GATE, held=False) is Verdict.PASS      # 10 dB out
    assert decide(frame(-30, -60, rest=-80), GATE, held=True) is Verdict.HELD


def test_near_end_speech_that_aec3_passes_opens_the_gate():
    assert decide(frame(-20, -22, rest=-21), GATE, held=False) is Verdict.NEAR
    assert decide(frame(-60, -61), GATE, held=False) is not Verdict.NEAR  # too quiet for a user


def test_output_louder_than_its_input_is_a_leak():
    """The capture restarted silent after a reopen: AEC3 leaves its own echo estimate."""
    assert decide(frame(-50, -40, recent=-50, ceiling=-36), GATE, held=False) is Verdict.LEAK
    assert decide(frame(-50, -40, recent=-50, known=False), GATE, held=False) is Verdict.LEAK
    assert decide(frame(-50, -40, recent=-38, ceiling=-36), GATE, held=False) is not Verdict.LEAK  # a word's tail


def test_output_above_the_delay_lines_rest_is_a_leak_unless_louder_than_any_echo():
    # AEC3 took 6 dB out, the far-end copies 25: AEC3 lost the path
    assert leaks(frame(-30, -36, rest=-55, ceiling=-28), GATE)
    assert decide(frame(-30, -36, rest=-55, ceiling=-32), GATE, held=False) is Verdict.LEAK
    # ... but 10 dB above the loudest echo this path makes: a user whose voice fits the far end
    f = frame(-20, -26, rest=-55, ceiling=-40)
    assert not leaks(f, GATE)
    assert decide(f, GATE, held=False) is not Verdict.LEAK
    assert leaks(frame(-20, -26, rest=-55, ceiling=-40, known=False), GATE)  # unmeasured: no exception


def test_a_user_aec3_ate_is_kept():
    # no echo path (ceiling at the noise floor): AEC3 took 60 dB out of a -30 dBFS frame
    f = frame(-30, -90, rest=-33, ceiling=-75, rest_ceiling=-80)
    assert keeps(f)
    assert decide(f, GATE, held=False) is Verdict.KEEP_MIC      # 10 dB above any echo: the mic
    # under a strong path: 3 dB over the ceiling, the copies' rest well above what they leave
    f = frame(-25, -85, rest=-35, ceiling=-27, rest_ceiling=-62)
    assert decide(f, GATE, held=False) is Verdict.KEEP_REST     # the mic holds echo: the rest
    # under the echo: the copies explained most of it, and the rest is far above what they miss
    assert decide(frame(-26, -88, rest=-36, ceiling=-26, rest_ceiling=-67), GATE, held=False) is Verdict.KEEP_REST


@pytest.mark.parametrize(("what", "f"), [
    ("path unmeasured", frame(-30, -90, rest=-33, ceiling=-75, rest_ceiling=-80, known=False)),
    ("no leak check", frame(-30, -90, ceiling=-75, rest_ceiling=-80)),
    ("too quiet", frame(-58, -90, rest=-58, ceiling=-90, rest_ceiling=-95)),
    ("AEC3 took under 6 dB", frame(-30, -34, rest=-33, ceiling=-75, rest_ceiling=-80)),
    ("the echo the copies leave", frame(-28, -90, rest=-62, ceiling=-26, rest_ceiling=-64)),
    ("a reverberant room's tail", frame(-28, -90, rest=-36, ceiling=-26, rest_ceiling=-38)),
    ("a path that just moved", frame(-39, -85, rest=-40, ceiling=-35, rest_ceiling=-67)),
])
def test_echo_is_never_kept(what, f):
    assert not keeps(f), what
    assert decide(f, GATE, held=False) in (Verdict.RESIDUAL, Verdict.NEAR, Verdict.PASS), what


def test_the_fit_runs_only_where_a_rule_needs_it():
    f, calls = counted(-30, -32, rest=-31)   # near: decided before any fit
    decide(f, GATE, held=False)
    assert calls == []
    f, calls = counted(-30, -90, rest=-33, ceiling=-75, rest_ceiling=-80)
    decide(f, GATE, held=False)
    assert len(calls) == 1


def test_double_talk_is_loud_and_above_any_echo():
    assert double_talk(frame(-20, -90, ceiling=-30))
    assert not double_talk(frame(-29, -90, ceiling=-30))
    assert not double_talk(frame(-20, -90, ceiling=-30, known=False))
    assert not double_talk(frame(-60, -90, ceiling=-90))


# ---- the coupling meter -------------------------------------------------------------------
def run(c: EchoCoupling, frames: list[tuple[bool, float, float, float | None]]) -> None:
    for active, e_in, far, rest in frames:
        c.frame(active, E(e_in), E(far) if far > -200 else 0.0, None if rest is None else E(rest))


def test_coupling_is_measured_at_the_start_of_each_burst():
    c = EchoCoupling(window_frames=4, quiet_frames=3)
    assert c.value is None and not c.measuring
    run(c, [(False, -90, -200, None)] * 3)
    run(c, [(True, -40, -20, -70), (True, -38, -20, -72)])
    assert c.measuring and c.value is None
    run(c, [(True, -45, -20, -75), (True, -50, -20, -71)])
    assert not c.measuring
    assert 10 * np.log10(c.value) == pytest.approx(-18.0)        # the largest ratio
    assert 10 * np.log10(c.rest_value) == pytest.approx(-50.0)
    assert 10 * np.log10(c.ceiling(E(-10)) / E(0)) == pytest.approx(-28.0)
    # later frames of the same burst (a user talking) change nothing
    run(c, [(True, -5, -20, -5)] * 10)
    assert 10 * np.log10(c.value) == pytest.approx(-18.0) and c.bursts == 1
    # a short pause is not a new burst; a long one is, and the path is measured again
    run(c, [(False, -90, -200, None)] * 2 + [(True, -5, -20, -5)] * 5)
    assert c.bursts == 1
    run(c, [(False, -90, -200, None)] * 3 + [(True, -60, -20, -90)] * 4)
    assert c.bursts == 2 and 10 * np.log10(c.value) == pytest.approx(-40.0)


def test_coupling_ignores_frames_without_far_end_in_view_and_a_burst_that_ends_early_counts():
    c = EchoCoupling(window_frames=10, quiet_frames=2, min_far=E(-50))
    run(c, [(False, -90, -200, None)] * 2 + [(True, -30, -60, None), (True, -30, -200, None)])
    assert c.value is None
    run(c, [(True, -40, -20, None), (False, -90, -200, None)])   # ends inside its window
    assert 10 * np.log10(c.value) == pytest.approx(-20.0)
    assert c.rest_value is None
    assert c.rest_ceiling(E(-20)) == pytest.approx(c.ceiling(E(-20)))  # no rest: the plain one


def test_coupling_arguments_are_checked():
    with pytest.raises(ValueError):
        EchoCoupling(window_frames=0)
    with pytest.raises(ValueError):
        EchoCoupling(min_far=-1.0)
