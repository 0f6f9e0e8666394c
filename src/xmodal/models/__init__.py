"""Models: towers (image/text), heads, and full models built by name.

``create_model(cfg)`` builds the model a :class:`xmodal.config.ModelConfig` describes;
``list_models()`` names the registered model types; ``load(run_dir)`` rebuilds a trained
model from a run folder (resolved config + safetensors weights).
"""
from __future__ import annotations

from typing import Any

from ..registry import Registry

MODELS: Registry = Registry("model type")


@MODELS.register("dual_encoder")
def _dual_encoder(cfg) -> Any:
    from .dual import DualEncoder, build_towers

    image, text = build_towers(cfg)
    head = lambda h: dict(input=h.input, pooling=h.pooling, pooling_args=h.pooling_args,  # noqa: E731
                          proj=h.proj, hidden_dim=h.hidden_dim, dropout=h.dropout)
    return DualEncoder(image, text, cfg.embed_dim, head(cfg.image_head), head(cfg.text_head),
                       frozen_image=cfg.image.frozen, frozen_text=cfg.text.frozen)


def _register_all() -> None:
    import importlib

    for mod in ("adapt", "aladin", "cross_encoder", "recipe"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


def create_model(cfg: Any = None, **overrides: Any) -> Any:
    """Build a model from a ``ModelConfig`` (or the default one with dotted ``overrides``)."""
    from ..config import ModelConfig, load_config

    _register_all()
    if cfg is None:
        cfg = load_config(None, [f"model.{k}={v}" for k, v in overrides.items()]).model
    elif not isinstance(cfg, ModelConfig):
        raise TypeError(f"create_model expects a ModelConfig, got {type(cfg).__name__}")
    return MODELS.create(cfg.type, cfg)


def list_models() -> list[str]:
    _register_all()
    return MODELS.names()


def load(run_dir: Any, checkpoint: str = "best", device: str = "cpu") -> Any:
    """Rebuild a trained model from a run folder (see :mod:`xmodal.train.checkpoint`)."""
    from ..train.checkpoint import load_model

    return load_model(run_dir, checkpoint=checkpoint, device=device)
