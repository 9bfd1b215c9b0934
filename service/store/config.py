"""What the API's and the workers' settings share: the default queue and reading a number from the environment."""

from __future__ import annotations

import os

__all__ = ["DEFAULT_QUEUE", "env_number"]

DEFAULT_QUEUE = "prunery"


def env_number(name: str, default: float, minimum: float = 0.0, maximum: float | None = None) -> float:
    """A number from the environment variable `name`, `default` when unset; out of bounds: ValueError."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{name}={raw!r} must be {bounds}")
    return value
