"""Contract: ``model.args`` and ``loss.args`` are typed dataclasses, one per registered model
type and per registered loss, checked on load with the key named in the error.

For every name in :data:`xmodal.models.base.MODELS` / :data:`xmodal.losses.LOSSES`: its args
dataclass (``MODEL_ARGS`` / ``LOSS_ARGS``) builds with its defaults, an unknown key is refused
naming ``model.args.<key>`` / ``loss.args.<key>``, and a value of the wrong type for each field
(generated from the field's annotation) is refused naming the field. Losses' defaults are the
constructors' defaults; every shipped config's args parse.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

import xmodal.models  # noqa: F401  (registers every model type)
from xmodal.config import ModelConfig, args_dict, check_arg, describe_type, load_config, parse_args
from xmodal.errors import ConfigError
from xmodal.losses import LOSS_ARGS, LOSSES, create_loss, loss_args
from xmodal.models.base import MODEL_ARGS, MODELS, check_model_args, parse_model_args

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "xmodal" / "configs"


# ---------------------------------------------------------------------------------------------
# bad values, generated from a field's annotation
# ---------------------------------------------------------------------------------------------
def _bad_values(tp: Any) -> list[Any]:
    """Values that do not have the annotated type (a string for a number or a flag, a number or
    a flag for a string, a bool for a number, ...)."""
    origin, params = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return ["not-a-choice", 1]
    if origin in (typing.Union, type(int | None)):
        rest = [p for p in params if p is not type(None)]
        if len(rest) == 1:
            return [v for v in _bad_values(rest[0]) if v is not None]
        return [{"not": "any of them"}, 2.5]
    if tp is bool:
        return ["yes", 1]
    if tp is int:
        return ["3", True, 2.5]
    if tp is float:
        return ["abc", True]
    if tp is str:
        return [3, True]
    if tp in (list, tuple) or origin in (list, tuple):
        item = params[0] if params else Any
        return ["abc"] + ([[v] for v in _bad_values(item)[:1]] if item is not Any else [])
    raise AssertionError(f"no bad value for the annotation {tp!r}: extend _bad_values")


def _field_cases(table: dict[str, type]) -> list[Any]:
    cases = []
    for name, cls in sorted(table.items()):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for i, bad in enumerate(_bad_values(hints[f.name])):
                cases.append(pytest.param(name, f.name, bad, id=f"{name}.{f.name}-{i}"))
    return cases


def _plain(value: Any) -> Any:
    """Tuples compared as lists (a YAML list parses to either)."""
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------------------------------------
# every registered name declares an args dataclass
# ---------------------------------------------------------------------------------------------
def test_contract_every_registered_loss_and_model_has_an_args_dataclass():
    assert set(LOSS_ARGS) == set(LOSSES.names())
    assert set(MODEL_ARGS) == set(MODELS.names())
    for cls in [*LOSS_ARGS.values(), *MODEL_ARGS.values()]:
        assert dataclasses.is_dataclass(cls) and isinstance(cls, type), cls
        for f in dataclasses.fields(cls):  # every field has a default: ``args: {}`` is valid
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
    for name in LOSSES.names():
        assert loss_args(name) is LOSS_ARGS[name]
    assert MODEL_ARGS["dual_encoder"] and not dataclasses.fields(MODEL_ARGS["dual_encoder"])


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(LOSS_ARGS))
def test_contract_loss_default_args_build(name):
    cls = LOSS_ARGS[name]
    default = cls()
    assert parse_args(cls, {}, "loss.args") == default
    assert parse_args(cls, None, "loss.args") == default
    assert isinstance(create_loss(name, **args_dict(default)), LOSSES.get(name))
    assert isinstance(create_loss(name), LOSSES.get(name))


@pytest.mark.parametrize("name", sorted(LOSS_ARGS))
def test_contract_loss_args_are_the_constructor_arguments(name):
    params = {k: p for k, p in inspect.signature(LOSSES.get(name)).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    default = LOSS_ARGS[name]()
    assert [f.name for f in dataclasses.fields(default)] == list(params)
    for key, p in params.items():
        assert _plain(getattr(default, key)) == _plain(p.default), f"{name}: loss.args.{key} default"


@pytest.mark.parametrize("name", sorted(LOSS_ARGS))
def test_contract_loss_unknown_key_refused(name):
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key 'loss.args.no_such_key' for loss {name}; "
                                                    "valid keys: ")):
        create_loss(name, no_such_key=1)


@pytest.mark.parametrize("name,key,bad", _field_cases(LOSS_ARGS))
def test_contract_loss_wrong_type_refused(name, key, bad):
    with pytest.raises(ConfigError, match=rf"^{re.escape(f'loss.args.{key}: expected ')}.+, got "):
        create_loss(name, **{key: bad})


def test_contract_hinge_margin():
    with pytest.raises(ConfigError, match=re.escape("loss.args.margin: expected a number, got 'abc'")):
        create_loss("hinge", margin="abc")
    with pytest.raises(ConfigError, match=re.escape("loss.args.margin: expected a number, got True")):
        create_loss("hinge", margin=True)  # a bool is not a number
    loss = create_loss("hinge", margin=1)  # an int is a number
    assert loss.margin == 1.0 and type(loss.margin) is float
    with pytest.raises(ConfigError, match=re.escape("loss.args.reduction: expected one of sum, mean, got 'avg'")):
        create_loss("hinge", reduction="avg")


def test_contract_loss_values_reach_the_constructor():
    loss = create_loss("triplet", margin=0.5, intra_modal=True, hardest_after=10.0)
    assert (loss.margin, loss.intra_modal, loss.hardest_after) == (0.5, True, 10)
    aladin = create_loss("aladin", terms="matching")  # one term may be given as a string
    assert aladin.terms == ["matching"]
    aladin = create_loss("aladin", terms=["alignment", "distillation"], weights=[1, 2])
    assert aladin.weights == {"alignment": 1.0, "distillation": 2.0}
    iais = create_loss("iais", pool="first_stage", cross_fit=["runs/f0", "runs/f1"], negatives=40)
    assert (iais.pool, iais.cross_fit, iais.negatives) == ("first_stage", ["runs/f0", "runs/f1"], 40)
    with pytest.raises(ConfigError, match=re.escape("loss.args.cross_fit: expected a list of strings or null")):
        create_loss("iais", cross_fit=[1, 2])


def test_contract_loss_choices_match_the_modules_constants():
    from xmodal.losses.relation import ALIGNMENTS, SCHEDULES, WARMUP_LOSSES

    hints = typing.get_type_hints(LOSS_ARGS["iais"])
    assert typing.get_args(hints["alignment"]) == ALIGNMENTS
    assert typing.get_args(hints["schedule"]) == SCHEDULES
    assert typing.get_args(hints["warmup_loss"]) == tuple(WARMUP_LOSSES)


# ---------------------------------------------------------------------------------------------
# models: the builder parses ``model.args`` before it builds anything
# ---------------------------------------------------------------------------------------------
def _model_classes() -> dict[str, type]:
    from xmodal.models.adapt import Adapt
    from xmodal.models.aladin import Aladin
    from xmodal.models.cross_encoder import CrossEncoder
    from xmodal.models.dual import DualEncoder

    return {"adapt": Adapt, "aladin": Aladin, "cross_encoder": CrossEncoder, "dual_encoder": DualEncoder}


@pytest.mark.parametrize("name", sorted(MODEL_ARGS))
def test_contract_model_default_args_build(name):
    cls = MODEL_ARGS[name]
    default = cls()
    assert parse_model_args(cls, {}, name) == default
    assert parse_model_args(cls, None, name) == default
    # a field's value given explicitly is the default parsed back
    for f in dataclasses.fields(cls):
        assert parse_model_args(cls, {f.name: getattr(default, f.name)}, name) == default


@pytest.mark.parametrize("name", sorted(MODEL_ARGS))
def test_contract_model_defaults_are_the_models_defaults(name):
    """Fields passed on to the model class keep its constructor's defaults."""
    params = inspect.signature(_model_classes()[name]).parameters
    default = MODEL_ARGS[name]()
    # same name, another meaning: the builder turns the count into the checkpoint's layers
    other = {"cross_encoder": {"text_layers"}}.get(name, set())
    for f in dataclasses.fields(default):
        if f.name in params and f.name not in other and params[f.name].default is not inspect.Parameter.empty:
            assert _plain(getattr(default, f.name)) == _plain(params[f.name].default), f"model.args.{f.name}"


@pytest.mark.parametrize("name", sorted(MODEL_ARGS))
def test_contract_model_unknown_key_refused(name):
    msg = f"unknown config key 'model.args.no_such_key' for model type {name}; valid keys: "
    with pytest.raises(ConfigError, match=re.escape(msg)):
        MODELS.create(name, ModelConfig(type=name, args={"no_such_key": 1}))


@pytest.mark.parametrize("name,key,bad", _field_cases(MODEL_ARGS))
def test_contract_model_wrong_type_refused(name, key, bad):
    with pytest.raises(ConfigError, match=rf"^{re.escape(f'model.args.{key}: expected ')}.+, got "):
        MODELS.create(name, ModelConfig(type=name, args={key: bad}))


def test_contract_dual_encoder_takes_no_model_args():
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'model.args.embed_dim' for model type "
                                                    "dual_encoder; valid keys: (none)")):
        MODELS.create("dual_encoder", ModelConfig(args={"embed_dim": 64}))


def test_contract_model_specific_checks_keep_their_messages():
    from xmodal.models.aladin import _check_args

    with pytest.raises(ConfigError, match=re.escape("model.args.smooth: expected a number, got 'ten'")):
        MODELS.create("adapt", ModelConfig(type="adapt", args={"smooth": "ten"}))
    with pytest.raises(ConfigError, match=re.escape("model.args.variant: expected one of t2i, i2t, ens, got 'both'")):
        MODELS.create("adapt", ModelConfig(type="adapt", args={"variant": "both"}))
    with pytest.raises(ConfigError, match=re.escape("model.args.members: only used with variant: ens")):
        MODELS.create("adapt", ModelConfig(type="adapt", args={"members": ["a", "b"]}))
    with pytest.raises(ConfigError, match=re.escape("model.args.ff_dim: expected an integer or null, got 'x'")):
        MODELS.create("aladin", ModelConfig(type="aladin", args={"ff_dim": "x"}))
    with pytest.raises(ConfigError, match="first, last"):
        _check_args({"align_skip_text": [1]})
    assert _check_args({"align_skip_text": [0, 3], "dropout": 0}).align_skip_text == (0, 3)
    with pytest.raises(ConfigError, match=re.escape("model.args.pooling: expected one of cls, mean, got 'max'")):
        MODELS.create("cross_encoder", ModelConfig(type="cross_encoder", args={"pooling": "max"}))


def test_contract_model_choices_match_the_modules_constants():
    from xmodal.models import adapt, aladin

    hints = typing.get_type_hints(MODEL_ARGS["adapt"])
    assert typing.get_args(hints["variant"]) == adapt.VARIANTS
    assert typing.get_args(hints["normalization"]) == adapt._NORMALIZATIONS
    assert typing.get_args(hints["region_act"]) == adapt._ACTIVATIONS
    assert typing.get_args(hints["fused"]) == adapt._FUSED
    assert typing.get_args(typing.get_type_hints(MODEL_ARGS["aladin"])["eval_head"]) == aladin.HEADS


def test_contract_check_model_args_still_checks_a_type_table():
    spec = {"a": (int, float), "b": (str, type(None)), "c": bool}
    assert check_model_args({"a": 2, "b": None}, spec, "x") == {"a": 2.0, "b": None}
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'model.args.d' for model type x; "
                                                    "valid keys: a, b, c")):
        check_model_args({"d": 1}, spec, "x")
    with pytest.raises(ConfigError, match=re.escape("model.args.a: expected a number, got 'z'")):
        check_model_args({"a": "z"}, spec, "x")
    with pytest.raises(ConfigError, match=re.escape("model.args.c: expected true/false, got 0")):
        check_model_args({"c": 0}, spec, "x")


# ---------------------------------------------------------------------------------------------
# the generic helper
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Example:
    rate: float = 0.5
    steps: int | None = None
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    names: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)
    on: bool = False


def test_contract_parse_args_types_and_words():
    got = parse_args(_Example, {"rate": 1, "steps": 4.0, "mode": "b", "sizes": [3], "names": ("x",),
                                "extra": {"k": 1}, "on": True}, "thing.args")
    assert got == _Example(1.0, 4, "b", (3,), ["x"], {"k": 1}, True)
    assert type(got.rate) is float and type(got.steps) is int
    assert parse_args(_Example, {"steps": None}, "thing.args").steps is None
    cases = {"rate": ("1.5", "a number"), "steps": (2.5, "an integer or null"), "mode": (True, "one of a, b"),
             "sizes": ([1, "2"], "a list of integers"), "names": ("x", "a list of strings"),
             "extra": ([], "a mapping"), "on": ("true", "true/false")}
    for key, (bad, words) in cases.items():
        with pytest.raises(ConfigError, match=re.escape(f"thing.args.{key}: expected {words}, got {bad!r}")):
            parse_args(_Example, {key: bad}, "thing.args")
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'thing.args.nope' for thing t; valid keys: "
                                                    "rate, steps, mode, sizes, names, extra, on")):
        parse_args(_Example, {"nope": 1}, "thing.args", "thing t")
    with pytest.raises(ConfigError, match=re.escape("thing.args: expected a mapping, got [1]")):
        parse_args(_Example, [1], "thing.args")
    assert describe_type(tuple[str, ...] | str | None) == "a list of strings or a string or null"
    assert check_arg(3, float, "x") == 3.0


# ---------------------------------------------------------------------------------------------
# every shipped config
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_contract_shipped_configs_args_parse(path):
    cfg = load_config(path)
    parse_model_args(MODEL_ARGS[cfg.model.type], cfg.model.args, cfg.model.type)
    parse_args(loss_args(cfg.loss.name), cfg.loss.args, "loss.args", f"loss {cfg.loss.name}")
