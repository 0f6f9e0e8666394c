"""Command-line option helpers shared by several commands."""
from __future__ import annotations


def key_values(pairs: list[str], flag: str = "--data-arg") -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``: reader or tower options, values read as YAML scalars (structured-looking strings kept as written)."""
    import yaml

    from ..errors import ConfigError

    out = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out[key.replace("-", "_")] = raw if isinstance(value, (dict, list)) else value
    return out
