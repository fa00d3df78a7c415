"""Large but tiny-on-disk test inputs, written row by row so making one never holds its pixels in memory.

A 40 MP 16-bit RGBA PNG of smooth gradients compresses to well under 100 KiB, yet a naive decode of it
takes over a gigabyte: the input that item 3 of the hardening issue is about.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(payload, zlib.crc32(kind)))


def png_16bit_rgba(width: int = 7290, height: int = 5480) -> bytes:
    """A ``width`` x ``height`` 16-bit RGBA PNG (default 40 MP): colour ramps repeating every 256 pixels,
    half transparent on the left. Every row after the first is the first again ("Up" filter, all zeros),
    so the deflate stream is tiny and quick to make."""
    x = (np.arange(width) % 256) / 255.0
    samples = np.stack([x * 65535, (1 - x) * 65535, np.full(width, 30000.0),
                        np.where(np.arange(width) < width // 2, 20000.0, 65535.0)], axis=-1).round().astype(">u2")
    compressor = zlib.compressobj(6)
    parts = [compressor.compress(b"\x00" + samples.tobytes())]
    same = b"\x02" + bytes(width * 8)  # filter type 2 (Up): each byte equals the one above
    parts += [compressor.compress(same) for _ in range(height - 1)]
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"".join([b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", ihdr), _chunk(b"IDAT", b"".join(parts)),
                     _chunk(b"IEND", b"")])
