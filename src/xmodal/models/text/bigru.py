"""Word-embedding + bidirectional GRU text tower (VSE++ / SCAN / ADAPT).

Follows the text encoder of ADAPT (``RNNEncoder`` in jwehrmann/retrieval.pytorch):
word embeddings -> GRU; with a bidirectional GRU the two directions are averaged per
token (``(out[..., :H] + out[..., H:]) / 2``), and the token vectors are L2-normalised
unless ``normalize=False``. The pooled vector is one of that project's text poolings:
``mean`` / ``max`` over the real tokens, or ``last`` (the output at the last real token).

The vocabulary is a word-level ``tokenizers`` tokenizer (lowercase, split on whitespace
and punctuation, ``<start> ... <end>`` around each caption as in VSE++). Its JSON string
is the tower's ``tokenizer_json`` argument, so a checkpoint's config can rebuild it exactly.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ...errors import ConfigError, DataError, XmodalError, where
from ..base import TEXT_TOWERS, TextTower, TowerOutput
from ..heads.pooling import MaxPool, MeanPool

log = logging.getLogger(__name__)

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = [PAD, START, END, UNK]  # ids 0, 1, 2, 3 as in VSE++'s vocabulary


def _build_tokenizer_pipeline(tok: "object") -> None:
    from tokenizers import normalizers, pre_tokenizers, processors

    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    # Whitespace splits on \w+|[^\w\s]+: words and runs of punctuation become separate tokens
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}", special_tokens=[(START, 1), (END, 2)])


def train_tokenizer(texts: Iterable[str], vocab_size: int = 30000, min_freq: int = 1,
                    path: str | os.PathLike | None = None) -> str:
    """Train a word-level tokenizer on ``texts``; returns its JSON string.

    Words seen fewer than ``min_freq`` times map to ``<unk>``; at most ``vocab_size``
    entries (special tokens included). When ``path`` is given the JSON is also written
    there atomically.
    """
    from tokenizers import Tokenizer, models, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    _build_tokenizer_pipeline(tok)
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_freq,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    text = tok.to_str()
    if path is not None:
        save_tokenizer(text, path)
    return text


def save_tokenizer(tokenizer_json: str, path: str | os.PathLike) -> None:
    """Write a tokenizer JSON string atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tokenizer_json)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tokenizer_json(path: str | os.PathLike) -> str:
    """Read a tokenizer JSON file written by :func:`train_tokenizer` / :func:`save_tokenizer`."""
    from tokenizers import Tokenizer

    try:
        text = Path(path).read_text(encoding="utf-8")
        Tokenizer.from_str(text)
    except OSError as e:
        raise DataError(where(path) + f"cannot read tokenizer: {e}") from e
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise DataError(where(path) + f"not a valid tokenizers JSON file: {e}") from e
    return text


def load_word_vectors(path: str | os.PathLike, vocab: dict[str, int], dim: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Read GloVe / word2vec text vectors (``word v1 v2 ...``) for the words in ``vocab``.

    Returns ``(vectors (V, dim), found (V,) bool)``; rows of words absent from the file are
    zero and ``found`` is False there. A word2vec header line ``"<count> <dim>"`` is
    skipped. A word may contain spaces (GloVe 840B has some): the last ``dim`` fields
    are the vector. Lookup is exact first, then lowercase. A malformed line raises
    :class:`DataError` naming the file and line.
    """
    path = Path(path)
    V = max(vocab.values()) + 1 if vocab else 0
    vectors: torch.Tensor | None = None
    found = torch.zeros(V, dtype=torch.bool)
    lower = {}
    for word, idx in vocab.items():
        lower.setdefault(word.lower(), []).append(idx)
    try:
        f = open(path, encoding="utf-8", errors="strict")
    except OSError as e:
        raise DataError(where(path) + f"cannot open word vectors: {e}") from e
    with f:
        try:
            for lineno, line in enumerate(f, start=1):
                parts = line.rstrip("\n").rstrip().split(" ")
                if not parts or parts == [""]:
                    continue
                if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                    file_dim = int(parts[1])  # word2vec header "<count> <dim>"
                    if dim is not None and file_dim != dim:
                        raise DataError(where(path, lineno) + f"vectors are {file_dim}-d, expected {dim}")
                    dim = file_dim
                    continue
                if vectors is None and dim is not None and len(parts) - 1 != dim:
                    raise DataError(where(path, lineno) + f"vectors are {len(parts) - 1}-d, expected {dim}")
                if dim is None:
                    dim = len(parts) - 1
                if dim < 1 or len(parts) < dim + 1:
                    raise DataError(where(path, lineno) + f"expected a word and {dim} numbers, "
                                    f"got {len(parts)} fields")
                word = " ".join(parts[:-dim])
                try:
                    values = [float(v) for v in parts[-dim:]]
                except ValueError as e:
                    raise DataError(where(path, lineno) + f"bad number in vector of {word!r}: {e}") from e
                if vectors is None:
                    vectors = torch.zeros(V, dim)
                if word in vocab:
                    ids = [vocab[word]]
                else:
                    ids = [i for i in lower.get(word.lower(), []) if not found[i]]
                for i in ids:
                    vectors[i] = torch.tensor(values)
                    found[i] = True
        except UnicodeDecodeError as e:
            raise DataError(where(path) + f"word vectors must be UTF-8 text: {e}") from e
    if vectors is None:
        raise DataError(where(path) + "no word vectors found (empty file?)")
    log.info("word vectors %s: %d of %d vocabulary words found", path, int(found.sum()), V)
    return vectors, found


@TEXT_TOWERS.register("bigru")
class BiGRUTextTower(TextTower):
    """Word embeddings + (bi)GRU over a word-level vocabulary.

    Output: tokens ``(B, L, out_dim)`` (one per word, ``<start>``/``<end>`` included),
    pooled ``(B, out_dim)``, mask ``(B, L)``.
    """

    def __init__(self, tokenizer_json: str | None = None, tokenizer_path: str | None = None,
                 word_dim: int = 300, out_dim: int = 1024, num_layers: int = 1, bidirectional: bool = True,
                 pooling: str = "mean", normalize: bool = True, max_length: int = 64,
                 word_vectors: str | None = None, freeze_word_vectors: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        from tokenizers import Tokenizer

        if pooling not in ("mean", "max", "last"):
            raise ConfigError(f"bigru: pooling must be mean, max or last, got {pooling!r}")
        if tokenizer_json is None and tokenizer_path is None:
            raise ConfigError("bigru: give tokenizer_json (a string) or tokenizer_path; "
                              "build one with xmodal.models.text.bigru.train_tokenizer")
        if tokenizer_json is None:
            tokenizer_json = load_tokenizer_json(tokenizer_path)
        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a plain Exception
            raise ConfigError(f"bigru: tokenizer_json is not a valid tokenizers JSON string: {e}") from e
        pad_id = self.tokenizer.token_to_id(PAD)
        if pad_id is None:
            raise ConfigError(f"bigru: the tokenizer has no {PAD!r} token")
        self.pad_id = pad_id
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=PAD)
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer_json = tokenizer_json
        self.max_length = max_length
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.word_dim = word_dim
        self.hidden = out_dim
        self.bidirectional = bidirectional
        self.pooling = pooling
        self.normalize = normalize
        self.output_dim = out_dim

        self.embed = nn.Embedding(self.vocab_size, word_dim, padding_idx=pad_id)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)  # VSE++ / SCAN initialisation
        if word_vectors:
            vectors, found = load_word_vectors(word_vectors, self.tokenizer.get_vocab(with_added_tokens=True),
                                               word_dim)
            if vectors.shape[1] != word_dim:
                raise ConfigError(f"bigru: word_dim={word_dim} but {word_vectors} has {vectors.shape[1]}-d vectors")
            with torch.no_grad():
                self.embed.weight[found] = vectors[found]
            if freeze_word_vectors:
                self.embed.weight.requires_grad_(False)
        with torch.no_grad():
            self.embed.weight[pad_id].zero_()
        self.rnn = nn.GRU(word_dim, out_dim, num_layers, batch_first=True, bidirectional=bidirectional,
                          dropout=dropout if num_layers > 1 else 0.0)
        self._mean = MeanPool()
        self._max = MaxPool()

    @property
    def vocab(self) -> dict[str, int]:
        """Word -> id mapping of the tokenizer."""
        return self.tokenizer.get_vocab(with_added_tokens=True)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Strings -> ``input_ids`` / ``attention_mask`` ``(B, L)`` (``<start> words <end>``)."""
        encs = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask}

    def forward(self, batch: dict[str, torch.Tensor]) -> TowerOutput:
        ids = batch["input_ids"].to(self.embed.weight.device)
        mask = batch.get("attention_mask")
        mask = (ids != self.pad_id) if mask is None else mask.to(ids.device).bool()
        lengths = mask.sum(dim=1)  # (B,)
        if bool((lengths == 0).any()):
            raise XmodalError("bigru: a text has no tokens (empty attention mask)")
        x = self.embed(ids)  # (B, L, word_dim)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])  # (B, L, dirs*H)
        if self.bidirectional:
            out = (out[:, :, : self.hidden] + out[:, :, self.hidden:]) / 2  # (B, L, H)
        if self.normalize:
            out = F.normalize(out, dim=-1)
        if self.pooling == "mean":
            pooled = self._mean(out, mask)
        elif self.pooling == "max":
            pooled = self._max(out, mask)
        else:
            pooled = out[torch.arange(out.shape[0], device=out.device), lengths - 1]  # (B, H)
        return TowerOutput(tokens=out, pooled=pooled, mask=mask)
