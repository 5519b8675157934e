"""Client-sent text made safe to repeat: cut to a length, and escaped to one printable line.

Error replies (`errors.shown`), config values in load errors (`config_check.shown`) and log
lines (`logs`) all repeat what a client sent. This module imports nothing of ours and not grpc,
so `logs` can use it before grpc is first imported (GRPC_VERBOSITY must be set before that).
"""

from __future__ import annotations


def clipped(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with the cut said out loud."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


def printable(text: str) -> str:
    """`text` with every non-printable character escaped as Python writes it in a repr
    (\\n, \\x1b, \\u2028, ...): it stays on one line (str.splitlines() finds no separator in
    it) and carries no terminal escape sequence."""
    if text.isprintable():  # the common case: one C-level scan
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
