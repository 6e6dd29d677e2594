"""PCM16 <-> base64 carriers, strict where the daemon relies on them."""

from __future__ import annotations

import base64
import binascii

from .errors import MalformedFrame


def encode_pcm(pcm: bytes) -> str:
    """Base64 text for an ``audio`` or ``delta`` field."""
    return base64.b64encode(pcm).decode("ascii")


def decode_pcm(text: object, field: str) -> bytes:
    """Decode a base64 PCM16 field; raises :class:`MalformedFrame` with the reason.

    Odd byte counts are rejected: half a sample would shift every later sample by one byte
    and turn the rest of the response into noise.
    """
    if not isinstance(text, str):
        raise MalformedFrame(f"{field} is {type(text).__name__}, expected base64 string")
    try:
        pcm = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedFrame(f"{field} is not valid base64 ({exc})") from None
    if len(pcm) % 2:
        raise MalformedFrame(f"{field} has an odd byte count ({len(pcm)}), not PCM16")
    return pcm
