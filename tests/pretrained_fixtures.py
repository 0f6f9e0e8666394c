"""Tiny randomly initialised CLIP and SigLIP models saved as Hugging Face folders, offline, and a
tiny OpenCLIP model (its model config JSON and a weight file; needs open-clip-torch).

Each folder holds what ``save_pretrained`` writes for a real checkpoint: the model (config +
safetensors weights), a tokenizer (the bundled MiniLM's WordPiece tokenizer, re-saved) and an
image processor (``CLIPImageProcessorPil`` / ``SiglipImageProcessorPil`` with small sizes).
Hidden size 32, 2 layers, 32-px images: built and saved in well under a second.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

HIDDEN, LAYERS, IMAGE, PATCH = 32, 2, 32, 8


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    from xmodal.models.text.hf import default_text_model_path

    return AutoTokenizer.from_pretrained(default_text_model_path(), local_files_only=True)


def _tower_sizes(vocab: int, tok) -> tuple[dict, dict]:
    text = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=2, max_position_embeddings=24, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                  image_size=IMAGE, patch_size=PATCH)
    return text, vision


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A ``CLIPModel`` (projection 16-d, logit scale ln 100) with a 32-px crop after a
    shortest-edge resize to 36 px, bicubic, OpenAI mean/std."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer()
    text, vision = _tower_sizes(tok.vocab_size, tok)
    # pool at the [SEP] token, as CLIP pools at its end-of-text token
    text.update(eos_token_id=tok.sep_token_id, bos_token_id=tok.cls_token_id)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=4.6052)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(
        str(folder))
    return folder


def write_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """A ``SiglipModel`` (logit scale 10, bias -10) with a 32 x 32 resize (no crop), mean/std 0.5."""
    from transformers import SiglipConfig, SiglipModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = _tokenizer()
    text, vision = _tower_sizes(tok.vocab_size, tok)
    text["projection_size"] = HIDDEN
    config = SiglipConfig(text_config=text, vision_config=vision)
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    with torch.no_grad():  # a trained model's terms, not the init's
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-7.5)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    SiglipImageProcessorPil(size={"height": IMAGE, "width": IMAGE}).save_pretrained(str(folder))
    return folder


#: a tiny OpenCLIP ViT (open_clip's own model-config format: embed_dim, vision_cfg, text_cfg);
#: the text side keeps CLIP's BPE vocabulary (open_clip's bundled SimpleTokenizer, no download)
OPEN_CLIP_ARCH = "xmodal-tiny-open-clip"
OPEN_CLIP_CONTEXT = 16
OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": IMAGE, "layers": LAYERS, "width": HIDDEN, "head_width": 16, "patch_size": PATCH},
    "text_cfg": {"context_length": OPEN_CLIP_CONTEXT, "vocab_size": 49408, "width": HIDDEN, "heads": 2,
                 "layers": LAYERS},
}


def write_tiny_open_clip(folder: Path, seed: int = 0, suffix: str = ".pt", logit_scale: float = 50.0,
                         logit_bias: float | None = None) -> tuple[Path, Path]:
    """A randomly initialised OpenCLIP ``CLIP`` model: ``(model config JSON, weight file)``.

    The JSON is named ``xmodal-tiny-open-clip.json`` (``...-sigmoid.json`` with a bias: its stem
    is the architecture name ``open_clip.add_model_config`` registers); the weights are
    ``model.state_dict()`` written with ``torch.save`` (``suffix`` ``.pt``) or safetensors
    (``.safetensors``), as OpenCLIP's training writes them (a ``{"state_dict": ...}`` dict with
    DDP's ``module.`` prefix for ``.pt``). ``logit_scale`` is a trained model's (not the init's
    1 / 0.07); ``logit_bias`` makes it a sigmoid-loss model (``init_logit_bias``)."""
    import json
    import math

    import open_clip

    cfg = dict(OPEN_CLIP_CONFIG, **({"init_logit_bias": logit_bias} if logit_bias is not None else {}))
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{OPEN_CLIP_ARCH}{'-sigmoid' if logit_bias is not None else ''}.json"
    config.write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(logit_scale))
    state = model.state_dict()
    weights = folder / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    else:  # a training checkpoint: open_clip_train saves {"epoch", "name", "state_dict", ...}
        torch.save({"epoch": 1, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()}},
                   str(weights))
    return config, weights


#: a tiny OpenCLIP ``CustomTextCLIP`` as OpenCLIP builds its SigLIP models: a timm ViT trunk
#: (``vit_tiny_patch16_224``, random, 224 px) with a linear head, a text transformer without a
#: causal mask pooled at the last position with a biased projection, and a logit bias
OPEN_CLIP_TIMM_ARCH = "xmodal-tiny-open-clip-timm"
OPEN_CLIP_TIMM_CONFIG = {
    "embed_dim": 16, "custom_text": True, "init_logit_bias": -5.0,
    "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                   "timm_pool": "", "timm_proj": "linear"},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": HIDDEN, "heads": 2, "layers": LAYERS,
                 "no_causal_mask": True, "pool_type": "last", "proj_bias": True},
}


def write_tiny_open_clip_timm(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """``(model config JSON, safetensors weights)`` of :data:`OPEN_CLIP_TIMM_CONFIG` (logit scale 10,
    bias -5: a trained sigmoid model's terms, not the init's)."""
    import json
    import math

    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{OPEN_CLIP_TIMM_ARCH}.json"
    config.write_text(json.dumps(OPEN_CLIP_TIMM_CONFIG, indent=2))
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**{k: v for k, v in OPEN_CLIP_TIMM_CONFIG.items() if k != "custom_text"}).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


def write_tiny_open_clip_hf_text(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """``(model config JSON, safetensors weights)`` of an OpenCLIP ``CustomTextCLIP`` whose text
    tower is a Hugging Face model (``HFTextEncoder``: the bundled MiniLM folder, mean pooling, an
    MLP projection) beside the tiny ViT of :data:`OPEN_CLIP_CONFIG`."""
    import json

    import open_clip
    from safetensors.torch import save_file

    from xmodal.models.text.hf import default_text_model_path

    mini = str(default_text_model_path())
    cfg = {"embed_dim": 16, "vision_cfg": OPEN_CLIP_CONFIG["vision_cfg"],
           "text_cfg": {"hf_model_name": mini, "hf_tokenizer_name": mini, "hf_proj_type": "mlp",
                        "hf_pooler_type": "mean_pooler", "hf_model_pretrained": False, "context_length": 20}}
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "xmodal-tiny-open-clip-hf-text.json"
    config.write_text(json.dumps(cfg, indent=2))
    torch.manual_seed(seed)
    model = open_clip.CustomTextCLIP(**cfg).eval()
    weights = folder / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return config, weights


def write_tiny_open_clip_dir(folder: Path, seed: int = 0) -> Path:
    """An OpenCLIP model folder (``open_clip:local-dir:DIR``, the layout of OpenCLIP's Hugging Face
    repositories): ``open_clip_config.json`` (:data:`OPEN_CLIP_CONFIG` and a preprocess config of
    its own: squash, bilinear, mean / std 0.5) and ``open_clip_model.safetensors``."""
    import json

    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear",
                  "resize_mode": "squash"}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OPEN_CLIP_CONFIG,
                                                               "preprocess_cfg": preprocess}, indent=2))
    torch.manual_seed(seed)
    model = open_clip.CLIP(**OPEN_CLIP_CONFIG).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder
