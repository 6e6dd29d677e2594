"""Facts about the Hydra wire protocol that both the daemon and the simulator rely on.

Everything here comes from the protocol reference (docs/protocol-notes.md summarises the
parts hydrad depends on). Nothing in this package knows about trio, sockets or audio devices.
"""

from __future__ import annotations

DEFAULT_ENDPOINT = "wss://api.smallest.ai/waves/v1/s2s"
DEFAULT_MODEL = "hydra-v1.1"
DEPRECATED_MODEL = "hydra"

#: Voice rosters per model tag. The deprecated tag's original voices are rejected by the
#: live service, so it accepts the union of the current rosters (reference §2.4).
VOICES_V11 = ("zoe", "maya", "elena", "ivy", "grace", "alex", "aria", "leo", "sam", "kai")
VOICES_V10 = (
    "vaughn", "brooks", "cole", "hayes", "pierce", "sterling", "ellis",
    "lane", "quinn", "arden", "rowan", "blair", "emery", "sawyer",
)
VOICE_ROSTERS: dict[str, tuple[str, ...]] = {
    "hydra-v1.1": VOICES_V11,
    "hydra-v1.0": VOICES_V10,
    "hydra": VOICES_V11 + VOICES_V10,
}
#: Accepted on every tag when ``voice`` is omitted (probe of 2026-08-21).
DEFAULT_VOICE = "sterling"
MODEL_TAGS = tuple(VOICE_ROSTERS)

#: Output rate when ``session.configured`` does not announce one (reference §3.3).
FALLBACK_OUTPUT_RATE: dict[str, int] = {"hydra-v1.1": 24000, "hydra-v1.0": 48000, "hydra": 48000}

INPUT_RATE = 16000
SAMPLE_WIDTH = 2  # PCM16
MIN_APPEND_BYTES = 320  # 10 ms: the service rejects smaller appends with invalid_audio
IDLE_TIMEOUT_S = 30.0

# Close codes (reference §1.4).
CLOSE_NORMAL = 1000
CLOSE_TRY_AGAIN_LATER = 1013

# error.code values (reference §4.4). The client switches on these.
ERR_INVALID_FRAME = "invalid_frame"
ERR_INVALID_REQUEST = "invalid_request_error"
ERR_INVALID_AUDIO = "invalid_audio"
ERR_TOOL_TIMEOUT = "tool_response_timeout"
ERR_SERVER_FULL = "server_full"
ERR_INTERNAL = "internal_error"
WARN_MODEL_DEPRECATED = "model_deprecated"

# response.done statuses and reasons (reference §4.3).
STATUS_COMPLETED = "completed"
STATUS_CANCELLED = "cancelled"
STATUS_INCOMPLETE = "incomplete"
STATUS_FAILED = "failed"
REASON_INTERRUPTED = "interrupted"
REASON_CLIENT_CANCELLED = "client_cancelled"

#: Keys a client may put in ``session.configure.session``. The service silently ignores
#: unknown keys, so the daemon validates against this list itself.
SESSION_KEYS = (
    "instructions", "voice", "tools", "generate_initial_response",
    "input_audio_format", "input_audio_sample_rate", "output_audio_format", "output_audio_sample_rate",
)
