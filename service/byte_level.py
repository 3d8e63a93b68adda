"""GPT-2's reversible byte -> printable-character map: the alphabet of byte-level BPE tokens (the ByteLevel
pre-tokenizer of GPT-2, Llama 3, Qwen and the demo model)."""

from __future__ import annotations


def bytes_to_unicode() -> dict[int, str]:
    """Each byte value -> the printable character that stands for it in a byte-level token."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
