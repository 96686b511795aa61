"""WebSocket frames the server sends, encoded once and shared by every subscriber.

A server-to-client frame is never masked, so without compression the bytes of one
text frame are the same for every connection: the fan-out writes them as they are.
"""

from __future__ import annotations

import struct

__all__ = ["text_frame"]

_FIN_TEXT = 0x81


def text_frame(payload: bytes) -> bytes:
    """Wrap UTF-8 bytes into one final, unmasked text frame (RFC 6455, 5.2).

    Args:
        payload: the message, already valid UTF-8.

    Returns:
        The frame header followed by the payload.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", _FIN_TEXT, length)
    elif length < 65536:
        header = struct.pack("!BBH", _FIN_TEXT, 126, length)
    else:
        header = struct.pack("!BBQ", _FIN_TEXT, 127, length)
    return header + payload
