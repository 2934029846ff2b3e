"""Numbers from files that anyone (a broken job, a hand edit, a bug) may have written.

Every reader of an evaluation summary, a scores table or a metrics file goes through these, so a
value is either a finite float or a reason it is not one: never an exception, never a NaN or an
infinity that slips through a comparison (`inf >= 6.0` is True; `nan >= 6.0` is False but
`not nan < 6.0` is True).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MISSING = object()  # `lookup` found no such key


def describe(value: object) -> str:
    """A short, safe rendering of any JSON value for a one-line message."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        digits = len(str(abs(value))) if value.bit_length() < 10_000 else None
        if digits is None or digits > 15:
            return f"an integer of {digits or 'over 3000'} digits"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def finite(value: object) -> tuple[float | None, str | None]:
    """`value` as a finite float, or (None, why not)."""
    if value is MISSING:
        return None, "missing"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, f"{describe(value)} is not a number"
    try:
        number = float(value)
    except OverflowError:
        return None, f"{describe(value)} is too large for a float"
    if not math.isfinite(number):
        return None, f"{describe(number)} is not finite"
    return number, None


def lookup(data: object, dotted: str) -> object:
    """data["a"]["b"] for "a.b"; MISSING when a key is absent or a level is not an object."""
    for key in dotted.split("."):
        if not isinstance(data, dict) or key not in data:
            return MISSING
        data = data[key]
    return data


def number_at(data: object, dotted: str) -> tuple[float | None, str | None]:
    """The finite float at a dotted path, or (None, "<path>: why not")."""
    value, problem = finite(lookup(data, dotted))
    return value, (f"{dotted}: {problem}" if problem else None)


def text_at(data: object, dotted: str) -> str | None:
    """The string at a dotted path, or None when absent or not a string."""
    value = lookup(data, dotted)
    return value if isinstance(value, str) else None


def read_json(path: Path, max_bytes: int = 64 * 1024 * 1024) -> tuple[Any, str | None]:
    """Parse a JSON file of any shape: (value, None) or (None, "why it cannot be read")."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return None, f"{path}: {size} bytes, over the {max_bytes}-byte limit"
        return json.loads(path.read_text(encoding="utf-8")), None
    except FileNotFoundError:
        return None, f"{path}: not found"
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{path}: cannot be read ({exc})"
    except RecursionError:
        return None, f"{path}: nested too deeply to be an evaluation file"
    except ValueError as exc:  # JSONDecodeError, and integers over Python's 4300-digit limit
        return None, f"{path}: not valid JSON ({str(exc).splitlines()[0]})"


def strict_json(value: Any) -> Any:
    """A copy that strict JSON parsers accept: non-finite floats become null, numpy scalars plain."""
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        return strict_json(item())
    return str(value)
