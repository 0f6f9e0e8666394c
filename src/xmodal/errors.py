"""User-facing errors.

Anything raised as :class:`XmodalError` is a problem with the user's input (a file,
a config key, a value) and is printed by the CLI as one clear line, without a traceback.
"""
from __future__ import annotations


class XmodalError(Exception):
    """A problem with user input; the message names the file, line or field."""


class DataError(XmodalError):
    """Malformed or inconsistent dataset files."""


class ConfigError(XmodalError):
    """Unknown key, wrong type or missing value in a config."""


def where(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format a location prefix such as ``data/caps.txt:12 [caption]: ``."""
    loc = str(path)
    if line is not None:
        loc += f":{line}"
    if field is not None:
        loc += f" [{field}]"
    return loc + ": "
