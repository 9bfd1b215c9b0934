"""The engine's errors: one base, `EngineError` (a `ValueError`: the input or the request cannot be served), whose
message is one printable line a person can act on, and the one formatter that makes such lines from text that
may come from an untrusted file (`one_line`) or from an exception (`exception_line`)."""

from __future__ import annotations

__all__ = ["EngineError", "exception_line", "one_line"]


class EngineError(ValueError):
    """Something the engine refuses or cannot do with this input (`PruneError`, `DatasetError`,
    `UnsafeArchiveError`, `ArchiveLoadError`, `TrainError`, `LatencyError`); `str()` is one line."""


def one_line(text: object, limit: int = 300) -> str:
    """`text` as one printable line of at most `limit` characters: newlines and other control characters escaped
    (names and messages may come from untrusted files: nothing is hidden after a line break), cut with "..." past
    the limit."""
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    return out if len(out) <= limit else out[: limit - 3] + "..."


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """"TypeName: the first line of its message" (a traceback or a driver's detail lines are left out), as
    `one_line`."""
    lines = str(exc).strip().splitlines()
    return one_line(f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": "), limit)
