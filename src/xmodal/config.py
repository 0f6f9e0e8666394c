"""Typed configuration: dataclasses filled from YAML with includes and dotted overrides.

A YAML file may start with ``include: other.yaml`` (or a list); included files are merged
first, then the file's own keys, then command-line overrides such as ``optim.lr=2e-4``.
Every key is checked against the dataclass tree: an unknown key is an error naming the key
and the valid ones, a value of the wrong type is an error naming the field, and every number
is checked against its range (:data:`RANGES`, :func:`validate`: ``train.batch_size >= 1``,
``optim.lr`` finite and > 0, no NaN or infinity anywhere, integers that fit 64 bits) before
any work starts. The resolved config is saved beside every run and checkpoint
(:func:`to_dict`, :func:`save`).

``model.args`` and ``loss.args`` stay free mappings here: each model type and each loss
declares a dataclass of its own arguments (``xmodal.models.base.MODEL_ARGS``,
``xmodal.losses.LOSS_ARGS``) and its builder checks them with :func:`parse_args`.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

_T = TypeVar("_T")


@dataclass
class DataConfig:
    format: str = "emoji"
    #: dataset location; for ``emoji`` the word ``emoji`` means the packaged dataset
    path: str = "emoji"
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    #: caption language used for training (``all`` = every language the data has)
    train_lang: str = "en"
    #: caption language used for validation and testing
    eval_lang: str = "en"
    #: extra keyword options for the training split's reader (e.g. emoji ``captions: label+tags``)
    train_options: dict = field(default_factory=dict)
    #: extra keyword options for every split's reader
    options: dict = field(default_factory=dict)
    #: a corrupt, missing or oversized image is ``skip``-ped (reported) or makes the run ``fail``
    on_bad_image: str = "skip"
    #: ``{folds: K, fold: f, seed: s}``: train without fold ``f`` of ``K`` (groups of items linked
    #: by captions stay together); the out-of-fold first stages of ``loss.args.cross_fit``
    train_holdout: dict = field(default_factory=dict)


@dataclass
class TowerConfig:
    #: registered tower name (``xmodal.models.base.IMAGE_TOWERS`` / ``TEXT_TOWERS``)
    name: str = ""
    #: constructor keyword arguments of the tower
    args: dict = field(default_factory=dict)
    #: frozen towers run once over the data and their outputs are cached
    frozen: bool = True


@dataclass
class HeadConfig:
    #: ``pooled`` uses the tower's pooled vector; ``tokens`` pools the tokens with ``pooling``
    input: str = "pooled"
    pooling: str = "mean"
    pooling_args: dict = field(default_factory=dict)
    #: ``linear``, ``mlp`` (2 layers, residual linear as VSE-infinity), ``voken_mlp`` (3 linears,
    #: ReLU + dropout between, the Vokenization sentence head) or ``identity``
    proj: str = "linear"
    hidden_dim: int = 1024
    dropout: float = 0.0


@dataclass
class ModelConfig:
    #: registered model type (``xmodal.models.MODELS``)
    type: str = "dual_encoder"
    embed_dim: int = 256
    image: TowerConfig = field(default_factory=lambda: TowerConfig("efficientnet_lite0", {}))
    text: TowerConfig = field(default_factory=lambda: TowerConfig("hf", {}))
    image_head: HeadConfig = field(default_factory=HeadConfig)
    text_head: HeadConfig = field(default_factory=HeadConfig)
    #: model-type specific keyword arguments
    args: dict = field(default_factory=dict)


@dataclass
class LossConfig:
    name: str = "infonce"
    args: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    #: ``cosine``, ``step`` or ``constant``, after ``warmup_steps`` of linear warmup
    schedule: str = "cosine"
    warmup_steps: int = 0
    step_size: int = 1000
    gamma: float = 0.1
    grad_clip: float = 0.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    eval_every: int = 200
    #: stop after this many evaluations without a better validation rsum (0 = never)
    early_stop: int = 0
    log_every: int = 20
    seed: int = 0
    device: str = "cpu"
    #: ``none``, ``bf16`` or ``fp16`` (CUDA only)
    amp: str = "none"
    keep_checkpoints: int = 2
    checkpoint_every: int = 0
    tensorboard: bool = True
    extract_batch_size: int = 64


@dataclass
class EvalConfig:
    protocol: str = "full"
    block_size: int = 1024
    #: two-stage evaluation of pair scorers: shortlist size (0 = exact)
    rerank_k: int = 0
    #: two-stage order = pair score + rerank_fusion x first-stage score (0 = pair score alone)
    rerank_fusion: float = 0.0


@dataclass
class Config:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------
def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # ValueError: an int of > 4300 digits
        raise ConfigError(f"{path}{_yaml_problem(exc, text)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping, got {type(data).__name__}")
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError(f"{path}: include: expected a file name or a list of file names, got {show_value(includes)}")
    merged: dict = {}
    for inc in includes:
        if not (path.parent / inc).is_file():
            raise ConfigError(f"{path}: include {inc!r}: config file not found (relative to this file's folder)")
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return _deep_merge(merged, data)


def _yaml_problem(exc: BaseException, text: str) -> str:
    """``:LINE: invalid YAML: <problem>`` on one line (the line where the parser stopped)."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: no mark, a position
        line = text.count("\n", 0, exc.position) + 1
        return f":{line}: invalid YAML: character {exc.character!r} is not allowed in YAML"
    mark = getattr(exc, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"{line}: invalid YAML: {problem}"


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not _is_free_dict_key(k):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _is_free_dict_key(key: str) -> bool:
    return False


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. optim.lr=2e-4")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r}: empty key")
    keys = [k.strip() for k in key.split(".")]
    if not all(keys):
        raise ConfigError(f"override {text!r}: empty part in the key {key.strip()!r} (expected e.g. optim.lr=2e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # not YAML: the text as it is
        value = raw
    return keys, value


def _set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[keys[-1]] = value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {show_value(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {show_value(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {show_value(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {show_value(value)}")
        try:
            return float(value)
        except (ValueError, OverflowError):  # not a number / an int too large for a float
            raise ConfigError(f"{where}: expected a number, got {show_value(value)}") from None
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return str(value)
            except ValueError:  # an int of more than 4300 digits
                raise ConfigError(f"{where}: expected a string, got {show_value(value)}") from None
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {show_value(value)}")
        return value
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {show_value(value)}")
        return dict(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {show_value(value)}")
        return list(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    return value


def _build(cls: type, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {show_value(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys{' of ' + where if where else ''}: "
                              f"{', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    obj = cls()
    for key, value in kwargs.items():
        cur = getattr(obj, key)
        if dataclasses.is_dataclass(cur) and isinstance(data[key], dict):
            # merge onto the default sub-config so partial sections keep other defaults
            merged = _merge_dataclass(cur, data[key], f"{where}.{key}" if where else key)
            setattr(obj, key, merged)
        else:
            setattr(obj, key, value)
    return obj


def _merge_dataclass(obj: Any, data: dict, where: str):
    base = to_dict(obj)
    return _build(type(obj), _deep_merge(base, data), where)


def from_dict(data: dict) -> Config:
    """A :class:`Config` from a plain mapping: unknown keys, types and ranges checked."""
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------
# value ranges: checked on every load, before any work starts
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """What a numeric field accepts: ``low`` (``> low`` when ``open_low``), below ``high``."""

    low: float
    open_low: bool = False
    high: float | None = None

    def accepts(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return above and (self.high is None or value < self.high)

    def words(self, integer: bool) -> str:
        low = int(self.low) if integer else self.low
        if self.high is not None:
            return f"a number in {'(' if self.open_low else '['}{low}, {self.high})"
        kind = "an integer" if integer else "a finite number"
        return f"{kind} {'>' if self.open_low else '>='} {low}"


_AT_LEAST_1, _AT_LEAST_0, _POSITIVE, _FRACTION = Range(1), Range(0), Range(0, open_low=True), Range(0, high=1)
#: the range of every numeric field of the config tree (a numeric field missing here fails the tests).
#: Integers must also fit 64 bits (``< 2**63``), floats must be finite.
RANGES: dict[str, Range] = {
    "model.embed_dim": _AT_LEAST_1,
    "model.image_head.hidden_dim": _AT_LEAST_1, "model.image_head.dropout": _FRACTION,
    "model.text_head.hidden_dim": _AT_LEAST_1, "model.text_head.dropout": _FRACTION,
    "optim.lr": _POSITIVE, "optim.weight_decay": _AT_LEAST_0, "optim.warmup_steps": _AT_LEAST_0,
    "optim.step_size": _AT_LEAST_1, "optim.gamma": _POSITIVE, "optim.grad_clip": _AT_LEAST_0,
    "optim.betas": _FRACTION,  # each of the two
    "train.steps": _AT_LEAST_1, "train.batch_size": _AT_LEAST_1,
    # 0 = off for the periodic ones (the last step is always evaluated and checkpointed)
    "train.eval_every": _AT_LEAST_0, "train.early_stop": _AT_LEAST_0, "train.log_every": _AT_LEAST_0,
    "train.seed": _AT_LEAST_0, "train.keep_checkpoints": _AT_LEAST_0, "train.checkpoint_every": _AT_LEAST_0,
    "train.extract_batch_size": _AT_LEAST_1,
    "eval.block_size": _AT_LEAST_1, "eval.rerank_k": _AT_LEAST_0, "eval.rerank_fusion": _AT_LEAST_0,
}
INT64_LIMIT = 2**63


def validate(cfg: Any, where: str = "") -> None:
    """Check every numeric field of a config (sub)tree against :data:`RANGES`: a
    :class:`ConfigError` ``"<dotted.key>: expected <range>, got <value>"`` for the first one out of
    range (NaN and infinities never pass; integers fit 64 bits)."""
    for f in dataclasses.fields(cfg):
        dotted = f"{where}.{f.name}" if where else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, dotted)
        elif dotted == "optim.betas":
            _check_betas(value, dotted)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            check_range(value, RANGES.get(dotted), dotted)


def check_range(value: float, rule: Range | None, where: str) -> None:
    """``value`` (an int or a float field) within ``rule`` (None: any finite value / 64-bit int)."""
    integer = isinstance(value, int)
    if integer and not -INT64_LIMIT <= value < INT64_LIMIT:
        raise ConfigError(f"{where}: expected an integer < 2**63, got {show_value(value)}")
    if not integer and not math.isfinite(value):
        expected = rule.words(False) if rule is not None else "a finite number"
        raise ConfigError(f"{where}: expected {expected}, got {show_value(value)}")
    if rule is not None and not rule.accepts(value):
        raise ConfigError(f"{where}: expected {rule.words(integer)}, got {show_value(value)}")


def _check_betas(value: list, where: str) -> None:
    ok = len(value) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and
                                 math.isfinite(b) and RANGES[where].accepts(b) for b in value)
    if not ok:
        raise ConfigError(f"{where}: expected a list of 2 numbers in [0, 1), got {show_value(value)}")


def show_value(value: Any, limit: int = 120) -> str:
    """``repr(value)`` for a one-line message: shortened past ``limit`` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int of more than 4300 digits
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (with includes), apply dotted overrides, validate and return it."""
    tree = _read_yaml(Path(path)) if path is not None else {}
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value)
    return from_dict(tree)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from .utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash(cfg: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# typed keyword arguments (``model.args``, ``loss.args``): one dataclass per model / loss
# ------------------------------------------------------------------------------------------
_WORDS = {bool: ("true/false", "true/false values"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings"), dict: ("a mapping", "mappings"),
          list: ("a list", "lists"), tuple: ("a list", "lists"), type(None): ("null", "nulls")}
_SEQUENCES = (list, tuple, collections.abc.Sequence)


class _Mismatch(Exception):
    """A value that does not have the annotated type (caught and worded per field)."""


def describe_type(tp: Any, plural: bool = False) -> str:
    """Words for an annotation: ``int | None`` -> ``an integer or null``, ``list[str]`` ->
    ``a list of strings``, ``Literal["a", "b"]`` -> ``one of a, b``."""
    origin, params = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(p) for p in params)
    if origin in (typing.Union, types.UnionType):
        if int in params and float in params:  # a number includes the integers
            params = tuple(p for p in params if p is not int)
        words = [describe_type(p, plural) for p in params if p is not type(None)]
        if type(None) in params:
            words.append("null")
        return " or ".join(words)
    if origin in _SEQUENCES or tp in (list, tuple):
        item = params[0] if params else Any
        if item is Any:
            return _WORDS[list][plural]
        return ("lists" if plural else "a list") + " of " + describe_type(item, plural=True)
    if origin is dict:
        return _WORDS[dict][plural]
    if tp in _WORDS:
        return _WORDS[tp][plural]
    return getattr(tp, "__name__", str(tp))


def _check_value(value: Any, tp: Any) -> Any:
    """``value`` as the annotation ``tp`` asks (ints widened to float, lists to tuples where the
    field is a tuple), or :class:`_Mismatch`. A bool is not a number; a number is not a string."""
    origin, params = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is typing.Literal:
        for choice in params:
            if type(value) is type(choice) and value == choice:
                return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in params:
            return None
        for option in params:
            if option is not type(None):
                try:
                    return _check_value(value, option)
                except _Mismatch:
                    pass
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Mismatch
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Mismatch
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {k: _check_value(v, params[1]) for k, v in value.items()} if params else dict(value)
    if tp in (list, tuple) or origin in _SEQUENCES:
        return _check_sequence(value, tp, origin, params)
    raise TypeError(f"parse_args: unsupported annotation {tp!r}")


def _check_sequence(value: Any, tp: Any, origin: Any, params: tuple) -> Any:
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    if origin is tuple and params and params[-1] is not Ellipsis:  # tuple[int, int]: fixed length
        if len(value) != len(params):
            raise _Mismatch
        return tuple(_check_value(v, p) for v, p in zip(value, params))
    item = params[0] if params else Any
    items = [_check_value(v, item) for v in value]
    return tuple(items) if tuple in (tp, origin) else items


def check_arg(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` (see :func:`parse_args`); else a
    :class:`ConfigError` ``"<where>: expected <type words>, got <value>"``."""
    try:
        return _check_value(value, tp)
    except _Mismatch:
        raise ConfigError(f"{where}: expected {describe_type(tp)}, got {value!r}") from None


def parse_args(cls: type[_T], mapping: Any, where: str, what: str = "") -> _T:
    """An instance of the dataclass ``cls`` from the keyword arguments in ``mapping`` (a model's
    ``model.args``, a loss's ``loss.args``; ``where`` is that dotted prefix for messages, ``what``
    e.g. ``model type adapt``). Keys missing from ``mapping`` keep the field defaults.

    An unknown key is a :class:`ConfigError` naming ``<where>.<key>`` and the valid keys; a value
    whose type is not the field's annotation (``bool``, ``int``, ``float`` (ints accepted),
    ``str``, ``list[X]`` / ``tuple[X, ...]``, ``dict``, ``X | None``, ``Literal[...]`` for
    choices) one naming ``<where>.<key>``, the type expected and the value. A bool is not a
    number, a number is not a string.
    """
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where}: expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in mapping.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{where}.{key}'{' for ' + what if what else ''}; "
                              f"valid keys: {', '.join(names) or '(none)'}")
        kwargs[key] = check_arg(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def args_dict(args: Any) -> dict[str, Any]:
    """The fields of an args dataclass instance as keyword arguments (shallow: values as they are)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
