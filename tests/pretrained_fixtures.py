"""Tiny randomly initialised CLIP and SigLIP models saved as Hugging Face folders, offline.

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
