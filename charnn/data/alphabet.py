"""Alphabets: text bytes <-> uint8 codes, with numpy and no Ray.

gorner98 is the seed's alphabet (Görner's ``my_txtutils``): 0 unknown, tab -> 1,
printable ASCII 32..126 -> c - 30, LF -> 97.  Text is decoded as UTF-8 (invalid bytes
replaced) and CRLF / lone CR become LF, so each *character* is one code.
bytes is lossless: each byte is its own code, 0..255.
"""
from __future__ import annotations

import codecs

import numpy as np

from charnn.errors import UserError

ALPHABETS = ("gorner98", "bytes")

_GORNER_TABLE = bytearray(256)  # every byte not listed below is "unknown" (0)
_GORNER_TABLE[9] = 1
_GORNER_TABLE[10] = 97
for _c in range(32, 127):
    _GORNER_TABLE[_c] = _c - 30
_GORNER_TABLE = bytes(_GORNER_TABLE)

_GORNER_DECODE = np.zeros(98, dtype=np.uint8)
_GORNER_DECODE[0] = 0  # unknown decodes to NUL, stripped by decode()
_GORNER_DECODE[1] = 9
_GORNER_DECODE[97] = 10
_GORNER_DECODE[2:97] = np.arange(32, 127, dtype=np.uint8)


def _one_nul_per_char(err: UnicodeEncodeError):
    # Non-ASCII characters become one NUL each, which the table maps to "unknown".
    return "\0" * (err.end - err.start), err.end


codecs.register_error("charnn.unknown", _one_nul_per_char)


class AlphabetError(UserError):
    """An alphabet name or a text that the alphabet cannot take."""


def alphabet_size(alphabet: str) -> int:
    if alphabet == "gorner98":
        return 98
    if alphabet == "bytes":
        return 256
    raise AlphabetError(f"unknown alphabet {alphabet!r}; use one of {', '.join(ALPHABETS)}")


def encode_bytes(data: bytes, alphabet: str = "gorner98") -> bytes:
    """Codes of the raw bytes of one whole document, one byte each (what the document cache holds)."""
    return StreamEncoder(alphabet).feed(data, final=True)


class StreamEncoder:
    """Encodes a document fed in chunks of any size, with exactly the codes ``encode_bytes`` gives
    the whole: a CR that ends a chunk waits for the next (it may start a CRLF), and a UTF-8
    character split between chunks is decoded whole."""

    def __init__(self, alphabet: str = "gorner98"):
        alphabet_size(alphabet)
        self.alphabet = alphabet
        self._held_cr = False
        self._utf8 = None  # made when the first non-ASCII byte comes

    def feed(self, data: bytes, final: bool = False) -> bytes:
        if self.alphabet == "bytes":
            return data
        if self._held_cr:
            data = b"\r" + data
        self._held_cr = not final and data.endswith(b"\r")
        if self._held_cr:
            data = data[:-1]
        if b"\r" in data:  # a memchr: most text has no CR, and the replaces are two full scans
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not data.isascii() or (self._utf8 and self._utf8.getstate()[0]):
            # Only non-ASCII text pays for decoding; one code per character after it.
            self._utf8 = self._utf8 or codecs.getincrementaldecoder("utf-8")(errors="replace")
            data = self._utf8.decode(data, final).encode("ascii", errors="charnn.unknown")
        return data.translate(_GORNER_TABLE)


def encode(data: bytes, alphabet: str = "gorner98") -> np.ndarray:
    """Codes (uint8, a read-only view: no copy of a large document) of the raw bytes of one document."""
    return np.frombuffer(encode_bytes(data, alphabet), dtype=np.uint8)


def encode_text(text: str, alphabet: str = "gorner98") -> np.ndarray:
    return encode(text.encode("utf-8"), alphabet)


def decode(codes, alphabet: str = "gorner98") -> str:
    """Text of a code sequence; unknown gorner98 codes are dropped."""
    codes = np.asarray(codes, dtype=np.int64)
    if alphabet == "bytes":
        return codes.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
    alphabet_size(alphabet)
    if codes.size and (codes.min() < 0 or codes.max() >= 98):
        raise AlphabetError("gorner98 codes must lie in 0..97")
    raw = _GORNER_DECODE[codes].tobytes().replace(b"\0", b"")
    return raw.decode("ascii")


def unknown_fraction(codes: bytes | np.ndarray, alphabet: str = "gorner98") -> float:
    """Share of codes that are "unknown": high for binary files fed to gorner98."""
    codes = np.frombuffer(codes, dtype=np.uint8)
    if alphabet != "gorner98" or codes.size == 0:
        return 0.0
    return (codes.size - np.count_nonzero(codes)) / codes.size
