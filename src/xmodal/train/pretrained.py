"""Turn a pretrained dual encoder into an xmodal run without training (``xmodal pretrained``).

The run folder::

    RUN/source/       the model as a Hugging Face folder (save_pretrained: config, safetensors
                      weights, tokenizer, image processor): the run's own copy, pinned by sha256
    RUN/config.yaml   the resolved config: ``dual_encoder`` with ``pretrained_image`` /
                      ``pretrained_text`` towers on ``hf:RUN/source`` (sha256 pinned), identity
                      heads, ``embed_dim`` and the loss (InfoNCE or SigLIP, with the model's own
                      scale and bias) read from the model
    RUN/best/         model.safetensors (what the config does not rebuild: nothing for frozen
                      towers), state.json (step 0), config.yaml, pretrained.json, manifest.json

so every verb that takes a run takes it (``eval``, ``index``, ``search``, ``serve``,
``--first-stage``), and ``xmodal train RUN/config.yaml --out FT`` fine-tunes it (the towers'
``frozen`` flags and the optimiser from ``--config``). ``open_clip:`` sources are not copied:
the run names the architecture (a name or a model config JSON) and weights (a tag or a file) as
given, local files pinned by their sha256.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from .. import config as C
from ..errors import ConfigError, XmodalError, where
from ..utils import atomic_write_text

log = logging.getLogger(__name__)

#: the config ``xmodal pretrained`` starts from when none is given
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pretrained" / "zero_shot.yaml"


def copy_source(spec: str, folder: Path) -> tuple[str, str | None, Any]:
    """Load ``spec`` and write it into ``folder`` as a Hugging Face folder (``hf:`` sources);
    ``(spec of the copy, its weights' sha256, the loaded model)``. ``open_clip:`` sources are
    loaded and named as they are (local files by absolute path), pinned by the sha256 of their
    weight file and model config when they are files (``(spec, sha256 or None, loaded)``; a hub
    tag or repository is not pinned)."""
    from ..models.pretrained import absolute_spec, load_source, source_digest, weights_digest

    loaded = load_source(spec, need="both")
    if loaded.source.kind != "hf":
        return absolute_spec(loaded.source), source_digest(loaded.source), loaded
    tmp = folder.parent / f".tmp-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    loaded.model.save_pretrained(str(tmp), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(tmp))
    loaded.image_processor.save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return f"hf:{folder.resolve()}", weights_digest(folder), loaded


def pretrained_config(cfg: C.Config, spec: str, sha256: str | None, loaded: Any) -> C.Config:
    """``cfg`` with the pretrained towers on ``spec`` (their other args kept), identity heads,
    the model's embedding size and the loss it was trained with."""
    from ..models.pretrained import embedding_dim, trained_loss

    m = cfg.model
    if m.type != "dual_encoder":
        raise ConfigError(f"model.type: xmodal pretrained writes a dual_encoder run, the config asks for {m.type!r} "
                          "(pair scorers take the towers in their own configs: model.image.name: pretrained_image)")
    pin = {"sha256": sha256} if sha256 else {}
    for side, tcfg in (("image", m.image), ("text", m.text)):
        keep = tcfg.args if tcfg.name == f"pretrained_{side}" else {}
        keep = {k: v for k, v in keep.items() if k not in ("source", "sha256")}
        tcfg.name, tcfg.args = f"pretrained_{side}", {"source": spec, **pin, **keep}
    for head in (m.image_head, m.text_head):
        head.input, head.proj = "pooled", "identity"
    m.embed_dim = embedding_dim(loaded)
    loss = trained_loss(loaded.model)
    cfg.loss = C.LossConfig(loss["name"], loss["args"])
    C.validate(cfg)
    return cfg


def write_pretrained_run(spec: str, out: str | Path, config: str | Path | None = None,
                         overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Write the run folder ``out`` of the pretrained dual encoder ``spec`` (see the module
    docstring); returns a summary (run, source, embed_dim, loss, family)."""
    from ..models import create_model
    from ..models.pretrained import logit_terms, parse_source
    from .checkpoint import save_best

    parse_source(spec, "SPEC")
    cfg = C.load_config(config or DEFAULT_CONFIG, overrides)  # config errors before any loading
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise XmodalError(f"{where(out)}already exists and is not an empty folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        run_spec, sha256, loaded = copy_source(spec, out / "source")
        cfg = pretrained_config(cfg, run_spec, sha256, loaded)
        model = create_model(cfg.model).eval()
        text = yaml.safe_dump(C.to_dict(cfg), sort_keys=False)
        scale, bias = logit_terms(loaded.model)
        info = {"source": spec, "run_source": run_spec, "sha256": sha256, "family": loaded.family,
                "embed_dim": cfg.model.embed_dim, "logit_scale": scale, "logit_bias": bias, "loss": cfg.loss.name}
        atomic_write_text(out / "config.yaml", text)
        save_best(out, 0, model, {}, text, {"pretrained.json": info})
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # a failed conversion leaves nothing behind
        raise
    return {"run": str(out), **info}


__all__ = ["DEFAULT_CONFIG", "copy_source", "pretrained_config", "write_pretrained_run"]
