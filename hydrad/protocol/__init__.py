"""The Hydra wire protocol, with no I/O: frame builders, typed events, constants.

Shared by the daemon and the simulator, and nothing else is.
"""

from . import client_frames, constants
from .audio import decode_pcm, encode_pcm
from .errors import MalformedFrame
from .server_events import (
    AudioDelta, AudioDone, Error, FunctionArgsDelta, FunctionArgsDone, Item, ItemAdded, ItemDone,
    ResponseCreated, ResponseDone, ServerEvent, SessionConfigured, SessionCreated, SessionUpdated,
    SpeechStarted, SpeechStopped, TranscriptDelta, UnknownEvent, Warning_, load_json_object,
    parse_server_frame,
)

__all__ = [
    "client_frames", "constants", "decode_pcm", "encode_pcm", "MalformedFrame",
    "AudioDelta", "AudioDone", "Error", "FunctionArgsDelta", "FunctionArgsDone", "Item", "ItemAdded",
    "ItemDone", "ResponseCreated", "ResponseDone", "ServerEvent", "SessionConfigured", "SessionCreated",
    "SessionUpdated", "SpeechStarted", "SpeechStopped", "TranscriptDelta", "UnknownEvent", "Warning_",
    "load_json_object", "parse_server_frame",
]
