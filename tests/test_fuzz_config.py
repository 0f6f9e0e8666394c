"""Property-based tests of the config loader (``load_config``: YAML files with includes, dotted
overrides): whatever the input, the result is a valid :class:`Config` (every numeric field in
range) or an :class:`XmodalError` whose one-line message names the key (or the file) — never
another exception.

Generated: YAML documents over the real keys and made-up ones with values of every YAML type
(NaN, infinities, huge integers, unicode, empty strings, lists, mappings, null), raw text,
``include:`` values of every shape (missing files, cycles, numbers, lists), and override strings
``a.b=c`` with random keys and values. Bounded to stay quick (about 100 examples each).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import typing
from pathlib import Path

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from xmodal.config import RANGES, Config, load_config
from xmodal.errors import XmodalError

#: 100 examples a test in the suite; XMODAL_FUZZ_EXAMPLES=5000 for a deeper local search
SETTINGS = settings(max_examples=int(os.environ.get("XMODAL_FUZZ_EXAMPLES", "100")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _leaves(cls: type, prefix: str = "") -> dict[str, typing.Any]:
    """Every dotted leaf key of the config tree, with its annotation."""
    out = {}
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, key + "."))
        else:
            out[key] = tp
    return out


LEAVES = _leaves(Config)
NUMERIC = sorted(k for k, tp in LEAVES.items() if tp in (int, float))
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in LEAVES if "." in k})
#: the rules the issue names, written out independently of config.RANGES
RULES = {"train.batch_size": lambda v: v >= 1, "train.steps": lambda v: v >= 1, "optim.lr": lambda v: v > 0,
         "optim.weight_decay": lambda v: v >= 0, "optim.warmup_steps": lambda v: v >= 0,
         "train.eval_every": lambda v: v >= 0, "eval.block_size": lambda v: v >= 1,
         "train.extract_batch_size": lambda v: v >= 1, "model.embed_dim": lambda v: v >= 1}

SPECIAL_TEXT = [".nan", ".NaN", ".inf", "-.inf", "1e400", "1.0e+400", "nan", "inf", "-0", "0", "-1", "1.0e+30",
                "12345678901234567890", "9" * 40, "", " ", "~", "null", "[]", "{}", "[1, 2, 3]", "{a: 1}", "yes", "no",
                "2024-01-01", "0x1F", "0o17", "1_000", "é", "日本", "\u2028", "\x85", "a=b", "!!binary aGk=",
                "!!python/object:os.system", "&a [*a]", "*nope", "'unterminated", "[1,", "\t", "- a\n- b"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 1, 2**63 - 1, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([float("nan"), float("inf"), -float("inf"), 0.0]),
    st.text(max_size=12), st.sampled_from(SPECIAL_TEXT),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6) | st.sampled_from(sorted(LEAVES)), inner, max_size=3), max_leaves=6)
segment = st.text(min_size=0, max_size=8).filter(lambda s: "=" not in s)
keys = st.one_of(
    st.sampled_from(sorted(LEAVES)), st.sampled_from(sorted(LEAVES)), st.sampled_from(SECTIONS + ["include", ""]),
    st.builds(lambda k, s: f"{k}.{s}", st.sampled_from(sorted(LEAVES) + SECTIONS), segment),
    st.lists(segment, min_size=1, max_size=4).map(".".join),
)


def _value_text(value: typing.Any) -> str:
    """A value as an override writes it: YAML flow text (or raw special text)."""
    if isinstance(value, str) and value in SPECIAL_TEXT:
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _check_valid(cfg: Config) -> None:
    """No numeric field out of range, no NaN/inf, every integer fits 64 bits."""
    for key, tp in LEAVES.items():
        node: typing.Any = cfg
        for part in key.split("."):
            node = getattr(node, part)
        if tp is float:
            assert isinstance(node, float) and math.isfinite(node), (key, node)
        if tp is int:
            assert isinstance(node, int) and not isinstance(node, bool) and -(2**63) <= node < 2**63, (key, node)
        if key in RULES:
            assert RULES[key](node), (key, node)
    assert len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), cfg.optim.betas


def _names_one_of(message: str, candidates: typing.Iterable[str]) -> bool:
    """Whether the message names one of the candidates (as is, escaped, or quoted when empty)."""
    return any((c and (c in message or repr(c)[1:-1] in message)) or repr(c) in message for c in candidates)


def _prefixes(key: str) -> list[str]:
    """The dotted prefixes of an override's key, as the loader reads it (parts stripped)."""
    parts = [p.strip() for p in key.split(".")]
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _paths(tree: typing.Any, prefix: tuple = ()) -> list[str]:
    """Every dotted key path of a parsed YAML document (any key type, as the loader words it)."""
    out = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            here = prefix + (str(k),)
            out.append(".".join(here))
            out += _paths(v, here)
    return out


def _load(path: Path | None, overrides: list[str]) -> tuple[Config | None, str | None]:
    """``(config, None)`` or ``(None, message)``; any other exception fails the test."""
    try:
        cfg = load_config(path, overrides)
    except XmodalError as exc:
        message = str(exc)
        assert message and len(message.splitlines()) == 1, repr(message)
        return None, message
    _check_valid(cfg)
    return cfg, None


# ------------------------------------------------------------------------------------------
@SETTINGS
@given(key=keys, value=values)
def test_fuzz_one_override(key, value):
    override = f"{key}={_value_text(value)}"
    cfg, message = _load(None, [override])
    if message is not None:
        assert _names_one_of(message, _prefixes(key) + [override]), (override, message)


@SETTINGS
@given(key=st.sampled_from(NUMERIC), value=st.one_of(
    st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.floats(),
    st.sampled_from([".nan", ".inf", "-.inf", "1.0e+400", "-0.0", "0", "-1", "1", "0.5", "1.0e+30", "2e-4",
                     "9223372036854775807", "9223372036854775808", "true", "'3'", "[1]", "{}", "~", ""])))
def test_fuzz_numeric_fields_are_in_range_or_named(key, value):
    override = f"{key}={value if isinstance(value, str) else _value_text(value)}"
    cfg, message = _load(None, [override])
    if message is not None:
        assert message.startswith(f"{key}: expected "), (override, message)
        assert "got " in message, message


@SETTINGS
@given(overrides=st.lists(st.builds(lambda k, v: f"{k}={_value_text(v)}", keys, values), max_size=4)
       | st.lists(st.text(max_size=15), max_size=3))
def test_fuzz_several_overrides(overrides):
    cfg, message = _load(None, overrides)
    if message is not None:
        candidates = [o for o in overrides]
        for o in overrides:
            if "=" in o:
                candidates += _prefixes(o.split("=", 1)[0])
        assert _names_one_of(message, candidates), (overrides, message)


documents = st.dictionaries(
    st.sampled_from(["name", "data", "model", "loss", "optim", "train", "eval"]) | st.text(max_size=6),
    st.one_of(values, st.dictionaries(st.sampled_from([k.split(".", 1)[1] for k in LEAVES if "." in k])
                                      | st.text(max_size=6), values, max_size=4)),
    max_size=5)


@SETTINGS
@given(doc=documents, override=st.none() | st.builds(lambda k, v: f"{k}={_value_text(v)}", keys, values))
def test_fuzz_yaml_documents(doc, override):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        overrides = [override] if override else []
        cfg, message = _load(path, overrides)
    if message is not None:
        candidates = _paths(doc) + [str(path)] + overrides
        if override:
            candidates += _prefixes(override.split("=", 1)[0])
        assert _names_one_of(message, candidates), (doc, override, message)


@SETTINGS
@given(text=st.text(max_size=60) | st.sampled_from(SPECIAL_TEXT) | st.builds(
    lambda k, v: f"{k}: {v}\n", st.sampled_from(SECTIONS + sorted(LEAVES)), st.sampled_from(SPECIAL_TEXT)))
def test_fuzz_raw_text_files(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "raw.yaml"
        path.write_text(text, encoding="utf-8")
        cfg, message = _load(path, [])
    if message is not None:
        try:
            parsed = yaml.safe_load(text)
        except Exception:
            parsed = None
        assert _names_one_of(message, [str(path)] + _paths(parsed)), (text, message)


includes = st.one_of(
    st.sampled_from(["base.yaml", "missing.yaml", "fuzz.yaml", "sub", "", "../base.yaml", "é.yaml"]),
    st.lists(st.sampled_from(["base.yaml", "missing.yaml", "fuzz.yaml", "other.yaml"]), max_size=3),
    scalars, st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)


@SETTINGS
@given(base=documents, top=documents, include=includes, other_includes_top=st.booleans())
def test_fuzz_includes(base, top, include, other_includes_top):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "sub").mkdir()
        (root / "base.yaml").write_text(yaml.safe_dump(base, allow_unicode=True), encoding="utf-8")
        other = {"include": "fuzz.yaml"} if other_includes_top else {"train": {"steps": 3}}
        (root / "other.yaml").write_text(yaml.safe_dump(other), encoding="utf-8")
        doc = {"include": include, **{k: v for k, v in top.items() if k != "include"}}
        try:
            text = yaml.safe_dump(doc, allow_unicode=True)
        except yaml.YAMLError:
            assume(False)
        (root / "fuzz.yaml").write_text(text, encoding="utf-8")
        cfg, message = _load(root / "fuzz.yaml", [])
    if message is not None:
        candidates = _paths(base) + _paths(doc) + _paths(other) + [str(root)]
        assert _names_one_of(message, candidates), (include, message)


def test_every_numeric_field_has_a_range():
    """A numeric field added to the config tree without a rule in config.RANGES fails here."""
    assert sorted(k for k in NUMERIC) == sorted(k for k in RANGES if LEAVES.get(k) in (int, float))
    assert set(RANGES) <= set(LEAVES)
