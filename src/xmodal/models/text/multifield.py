"""Multi-field text tower: one transformer per text field, fused into one vector (X-MRS).

X-MRS (Guerrero et al., ACM MM 2021) encodes a recipe's title, ingredients and
instructions each with its own transformer encoder, averages each encoder's output tokens,
concatenates the three field vectors and maps them with one fully connected "merger" layer
into the 1,024-d shared space. Here the tower does everything up to the concatenation:

- ``pooled``: the field vectors concatenated, ``(B, F * H)``; the dual encoder's projection
  head (``proj: linear``) is the merger.
- ``tokens``: every field's tokens one after the other, ``(B, sum L_f, F * H)``, with the
  mask; a token of field ``f`` fills block ``f`` of the ``F * H`` space (zeros elsewhere), so
  tokens and pooled share one width and a token-level head still tells the fields apart.

Each field encoder is either a Hugging Face encoder (``name_or_path``, e.g. a multilingual
BERT; ``pretrained=True`` loads its weights, ``False`` only its architecture size and
vocabulary) or a small transformer trained from scratch over that model's tokenizer
(``scratch=True``: ``num_layers`` x ``num_heads`` x ``hidden_dim``, learned positions, as the
X-MRS recipe encoder). The default tokenizer is the bundled offline MiniLM's wordpiece
vocabulary (uncased; covers Latin, Cyrillic and kana well, Chinese/Thai poorly).

Inputs: a record ``{"title": ..., "ingredients": ..., "instructions": ...}`` per text; a
plain string is a record whose first field is the string and whose other fields are empty
(a free-text query, or a dataset whose texts have a single field).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ...errors import ConfigError, XmodalError
from ..base import TEXT_TOWERS, TextTower, TowerOutput
from ..heads.pooling import MeanPool
from .hf import resolve_model_path

log = logging.getLogger(__name__)

RECIPE_FIELDS = ("title", "ingredients", "instructions")


class ScratchEncoder(nn.Module):
    """Token + learned position embeddings -> pre-LN transformer encoder; tokens ``(B, L, H)``."""

    def __init__(self, vocab_size: int, hidden_dim: int, num_layers: int, num_heads: int, max_length: int,
                 dropout: float, pad_id: int) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ConfigError(f"multifield: hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}")
        self.embed = nn.Embedding(vocab_size, hidden_dim, padding_idx=pad_id)
        self.pos = nn.Embedding(max_length, hidden_dim)
        layer = nn.TransformerEncoderLayer(hidden_dim, num_heads, dim_feedforward=4 * hidden_dim, dropout=dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        x = self.embed(input_ids) + self.pos(torch.arange(L, device=input_ids.device))[None]  # (B, L, H)
        x = self.encoder(x, src_key_padding_mask=~attention_mask.bool())  # (B, L, H)
        return self.norm(x)


class _HFEncoder(nn.Module):
    """A ``transformers`` encoder returning its last hidden states ``(B, L, H)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # the tanh pooler of BERT-like models is unused: keep it out of the trainable set
        if isinstance(getattr(model, "pooler", None), nn.Module):
            model.pooler.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _layer_list(model: nn.Module, n: int) -> nn.ModuleList | None:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    return None


@TEXT_TOWERS.register("multifield")
class MultiFieldTextTower(TextTower):
    """One encoder per field (title / ingredients / instructions), mean-pooled and concatenated.

    Arguments: ``fields`` (names, in fusion order); ``name_or_path`` (Hugging Face model for
    the tokenizer and, unless ``scratch``, the encoders; None = bundled MiniLM);
    ``scratch`` (train small transformers from scratch: ``num_layers``, ``num_heads``,
    ``hidden_dim``, ``dropout``); ``pretrained`` (load the HF weights, else random init of the
    same architecture); ``num_layers`` with an HF model keeps only its first layers;
    ``freeze_layers`` fixes the embeddings and first blocks of each HF encoder;
    ``share_encoder`` uses one encoder for every field; ``max_length`` (int, or per-field dict).
    """

    def __init__(self, fields: Sequence[str] = RECIPE_FIELDS, name_or_path: str | None = None,
                 scratch: bool = False, pretrained: bool = True, num_layers: int | None = None,
                 num_heads: int = 4, hidden_dim: int = 512, dropout: float = 0.1, freeze_layers: int = 0,
                 share_encoder: bool = False, max_length: int | Mapping[str, int] = 64) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        fields = [str(f) for f in ([fields] if isinstance(fields, str) else fields)]
        if not fields or len(set(fields)) != len(fields):
            raise ConfigError(f"multifield: fields must be distinct names, got {fields!r}")
        self.fields = fields
        if isinstance(max_length, Mapping):
            unknown = sorted(set(max_length) - set(fields))
            if unknown:
                raise ConfigError(f"multifield: max_length names unknown fields {unknown}; fields are {fields}")
            self.max_length = {f: int(max_length.get(f, 64)) for f in fields}
        else:
            self.max_length = {f: int(max_length) for f in fields}
        path = resolve_model_path(name_or_path)
        local = Path(path).exists()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
        except (OSError, ValueError) as e:
            raise XmodalError(f"multifield text tower: cannot load the tokenizer of {path!r}: {e}") from e
        self.name_or_path = path
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        def build() -> nn.Module:
            if scratch:
                return ScratchEncoder(len(self.tokenizer), hidden_dim, num_layers or 2, num_heads,
                                      max(self.max_length.values()), dropout, pad_id)
            try:
                if pretrained:
                    model = AutoModel.from_pretrained(path, local_files_only=local)
                else:
                    model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=local))
            except (OSError, ValueError) as e:
                raise XmodalError(f"multifield text tower: cannot load {path!r}: {e}") from e
            n = int(getattr(model.config, "num_hidden_layers", 0))
            layers = _layer_list(model, n)
            if num_layers is not None and num_layers < n:
                if layers is None:
                    raise ConfigError(f"multifield: cannot truncate {path!r} to {num_layers} layers")
                del layers[num_layers:]  # keep the first blocks; the model reads the list's length
                model.config.num_hidden_layers = num_layers
                n = num_layers
            if freeze_layers:
                if layers is None or freeze_layers > n:
                    raise ConfigError(f"multifield: cannot freeze {freeze_layers} layers of {path!r} ({n} layers)")
                getattr(model, "embeddings", model.get_input_embeddings()).requires_grad_(False)
                for block in layers[:freeze_layers]:
                    block.requires_grad_(False)
            return _HFEncoder(model)

        first = build()
        self.encoders = nn.ModuleDict({f: first if (share_encoder or k == 0) else build()
                                       for k, f in enumerate(fields)})
        self.share_encoder = share_encoder
        self.hidden = hidden_dim if scratch else int(first.model.config.hidden_size)
        self.output_dim = self.hidden * len(fields)
        self.mean_pool = MeanPool()
        log.debug("multifield tower: fields=%s, %s encoder(s) from %s, %d-d each", fields,
                  "1 shared" if share_encoder else len(fields), path, self.hidden)

    def records(self, texts: Sequence[str | Mapping[str, str]]) -> dict[str, list[str]]:
        """Per-field string lists; a plain string fills the first field."""
        out: dict[str, list[str]] = {f: [] for f in self.fields}
        for k, t in enumerate(texts):
            if isinstance(t, str):
                rec = {self.fields[0]: t}
            elif isinstance(t, Mapping):
                missing = [f for f in self.fields if f not in t]
                if missing and len(missing) == len(self.fields):
                    raise XmodalError(f"multifield: text {k} has none of the fields {self.fields} "
                                      f"(it has {sorted(t)})")
                rec = t
            else:
                raise XmodalError(f"multifield: text {k} must be a string or a field mapping, got {type(t).__name__}")
            for f in self.fields:
                out[f].append(str(rec.get(f) or ""))
        return out

    def tokenize(self, texts: Sequence[str | Mapping[str, str]]) -> dict[str, torch.Tensor]:
        """Texts -> ``{"<field>.input_ids", "<field>.attention_mask"}``, each ``(B, L_field)``,
        and ``attention_mask`` ``(B, sum L_field)``: the mask of the output tokens."""
        batch: dict[str, torch.Tensor] = {}
        for f, strings in self.records(texts).items():
            enc = self.tokenizer(strings, padding=True, truncation=True, max_length=self.max_length[f],
                                 return_tensors="pt")
            batch[f"{f}.input_ids"] = enc["input_ids"]
            batch[f"{f}.attention_mask"] = enc["attention_mask"]
        batch["attention_mask"] = torch.cat([batch[f"{f}.attention_mask"] for f in self.fields], dim=1)
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> TowerOutput:
        device = next(self.parameters()).device
        tokens, masks, pooled = [], [], []
        F_, H = len(self.fields), self.hidden
        for k, f in enumerate(self.fields):
            ids = batch[f"{f}.input_ids"].to(device)
            mask = batch[f"{f}.attention_mask"].to(device).bool()
            h = self.encoders[f](ids, mask)  # (B, L_f, H)
            tokens.append(torch.nn.functional.pad(h, (k * H, (F_ - 1 - k) * H)))  # (B, L_f, F * H)
            masks.append(mask)
            pooled.append(self.mean_pool(h, mask))  # (B, H)
        return TowerOutput(tokens=torch.cat(tokens, dim=1),  # (B, sum L_f, F * H)
                           pooled=torch.cat(pooled, dim=-1),  # (B, F * H)
                           mask=torch.cat(masks, dim=1))  # (B, sum L_f)

    def extra_repr(self) -> str:
        return f"fields={self.fields}, hidden={self.hidden}, shared={self.share_encoder}"


__all__ = ["MultiFieldTextTower", "RECIPE_FIELDS", "ScratchEncoder"]
