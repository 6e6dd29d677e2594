"""``hydrad sim``: a protocol-faithful local Hydra simulator (reference §8).

It shares only :mod:`hydrad.protocol` with the daemon, so a daemon bug cannot be mirrored by
the simulator and go unnoticed. See ``docs/simulator.md``.
"""

from .config import ScenarioError, SimConfig, ToolCallSpec, TurnAction, load_scenario
from .record import ResponseRecord, SimSessionRecord
from .server import Simulator
from .voice import dominant_frequency, response_f0, synthesize

__all__ = [
    "ResponseRecord", "ScenarioError", "SimConfig", "SimSessionRecord", "Simulator", "ToolCallSpec",
    "TurnAction", "dominant_frequency", "load_scenario", "response_f0", "synthesize",
]
