"""Index a collection with a trained run, search it, and retrieve images for a text corpus.

The library behind ``xmodal index``, ``xmodal search`` and ``xmodal retrieve-corpus``:

* :func:`build_index` encodes one side of a collection (a split of the run's dataset, any
  ``FORMAT:PATH[:SPLIT]`` dataset, or a folder of images) into an :class:`xmodal.index.Index`
  folder whose ``model_ref`` says which run, checkpoint, config and weights made the vectors.
* :func:`load_index_model` rebuilds that model (refusing one whose config or weights changed).
* :func:`search_text` / :func:`search_image` answer one query as a list of result dicts.
* :func:`retrieve_corpus` streams a large text file through the model and the index, one JSON
  line per sentence, resumable after an interruption (see :class:`_Progress`).

Only a model's ``encode_image`` / ``encode_text`` are used, so any :class:`EmbeddingScorer` works.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import ConfigError, DataError, XmodalError, where
from .index import MAX_K, Index, list_backends
from .models.base import EmbeddingScorer, PairScorer
from .utils import atomic_write_json

log = logging.getLogger(__name__)

#: Suffixes indexed from a folder of images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: The corpus signature hashes this many leading bytes (with the size and mtime).
HEAD_BYTES = 1 << 20
PROGRESS_SUFFIX = ".progress.json"
PROGRESS_FORMAT = "xmodal-retrieve-corpus"
#: Line breaks to ``str.splitlines`` that ``json.dumps(ensure_ascii=False)`` leaves raw; escaped
#: so that one output record is always one line for every JSONL reader.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


# ---------------------------------------------------------------------------------------------
# model reference


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint_dir(run: Path, checkpoint: str) -> Path:
    from .train.checkpoint import latest_checkpoint

    if checkpoint == "best":
        return run / "best"
    if checkpoint == "latest":
        path = latest_checkpoint(run)
        if path is None:
            raise XmodalError(f"{where(run)}no checkpoint yet")
        return path
    return Path(checkpoint)


def model_ref(run: str | os.PathLike, checkpoint: str = "best") -> dict[str, Any]:
    """What identifies the vectors a run makes: absolute run path, checkpoint, config and weight hashes.

    ``checkpoint="latest"`` is resolved to the absolute folder of the current latest step,
    so that a run that keeps training does not silently change the model behind an index.
    """
    run = Path(run).resolve()
    ck = _checkpoint_dir(run, checkpoint)
    weights = ck / "model.safetensors"
    config = run / "config.yaml" if (run / "config.yaml").is_file() else ck / "config.yaml"
    if not weights.is_file() or not config.is_file():
        raise XmodalError(f"{where(run)}no {checkpoint!r} checkpoint with model.safetensors and "
                          "config.yaml (is this an xmodal run folder?)")
    return {"run": str(run), "checkpoint": checkpoint if checkpoint == "best" else str(ck.resolve()),
            "config_hash": _sha256_file(config), "weights_sha256": _sha256_file(weights)}


def _same_model(a: dict[str, Any] | None, b: dict[str, Any]) -> str | None:
    """None when ``a`` and ``b`` name the same model, else which field differs."""
    if a is None:
        return "model_ref (the index records none)"
    for key in ("run", "checkpoint", "config_hash", "weights_sha256"):
        if a.get(key) != b.get(key):
            return key
    return None


def check_embedding_model(model: Any) -> EmbeddingScorer:
    """Refuse models whose scores cannot be indexed (pair scorers without first-stage vectors)."""
    if isinstance(model, PairScorer) and not isinstance(model, EmbeddingScorer):
        raise ConfigError(f"{type(model).__name__} is a pair scorer: its scores need both sides at once, "
                          "so it has no vectors to index. Index with an embedding model (e.g. a dual "
                          "encoder) and re-rank its shortlist with the pair scorer")
    if not isinstance(model, EmbeddingScorer):
        raise ConfigError(f"{type(model).__name__} is not an embedding scorer (no encode_image/encode_text)")
    return model


def load_index_model(index: Index, run: str | os.PathLike | None = None) -> EmbeddingScorer:
    """The model that made ``index``'s vectors, from its ``model_ref`` (or ``run``, if moved).

    Raises :class:`XmodalError` when the run is gone or its config / weights no longer match.
    """
    from .models import load

    ref = index.model_ref
    if ref is None or "run" not in ref:
        if run is None:
            raise XmodalError(f"{where(index.path)}the index records no model (built with the library "
                              "without model_ref?); pass the run folder with --run")
        ref = {"run": str(run), "checkpoint": "best"}
        current = model_ref(run, "best")
    else:
        src = Path(run) if run is not None else Path(ref["run"])
        ck = ref.get("checkpoint", "best")
        if not src.is_dir():
            raise XmodalError(f"{where(src)}the run folder that built {index.path} is missing (moved?); "
                              "pass its new location with --run")
        current = model_ref(src, ck)
        for key in ("config_hash", "weights_sha256"):
            if key in ref and ref[key] != current[key]:
                what = "config.yaml" if key == "config_hash" else "weights"
                raise XmodalError(f"{where(index.path)}the run {src} has different {what} than when the index "
                                  "was built; rebuild the index with xmodal index")
    model = load(current["run"], checkpoint=current["checkpoint"])
    return check_embedding_model(model)


# ---------------------------------------------------------------------------------------------
# data specs


@dataclass(frozen=True)
class DataSpec:
    """Parsed ``--data``: ``kind`` is ``split`` (of the run's dataset), ``dataset`` or ``folder``."""

    kind: str
    path: str = ""
    format: str = ""
    split: str = ""

    def describe(self) -> str:
        if self.kind == "folder":
            return f"folder {self.path}"
        if self.kind == "split":
            return f"split {self.split} of the run's dataset"
        return f"{self.format}:{self.path} split {self.split}"


def parse_data_spec(spec: str, default_split: str = "test") -> DataSpec:
    """``split:NAME``, ``FORMAT:PATH[:SPLIT]`` or a folder of images."""
    from .data.base import list_formats

    if not spec or not spec.strip():
        raise ConfigError("--data is empty: give split:NAME, FORMAT:PATH[:SPLIT] or a folder of images")
    head, sep, rest = spec.partition(":")
    if sep and head == "split":
        if not rest:
            raise ConfigError(f"--data {spec!r}: split:NAME needs a split name (e.g. split:test)")
        return DataSpec("split", split=rest)
    if sep and head in list_formats():
        if not rest:
            raise ConfigError(f"--data {spec!r}: {head}:PATH[:SPLIT] needs a path")
        path, split = rest, default_split
        # ``PATH:SPLIT`` unless the whole rest names an existing file (a path with a colon)
        if ":" in rest and not Path(rest).exists():
            path, split = rest.rsplit(":", 1)
            if not split:
                raise ConfigError(f"--data {spec!r}: empty split after the last ':'")
        return DataSpec("dataset", path=path, format=head, split=split)
    if Path(spec).is_dir():
        return DataSpec("folder", path=spec)
    if Path(spec).exists():
        raise ConfigError(f"--data {spec!r}: a file; give FORMAT:{spec}[:SPLIT] (formats: "
                          f"{', '.join(list_formats())}), split:NAME or a folder of images")
    raise ConfigError(f"--data {spec!r}: no such folder, and not split:NAME or FORMAT:PATH[:SPLIT] "
                      f"(formats: {', '.join(list_formats())})")


def list_image_files(folder: Path) -> list[Path]:
    """Every image file (by suffix) under ``folder``, sorted by relative path."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


# ---------------------------------------------------------------------------------------------
# building an index


@dataclass
class BuildResult:
    path: Path
    modality: str
    added: int
    total: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _head_inputs(cfg: Any, model: Any) -> tuple[str, str]:
    needs = getattr(model, "input_needs", None)
    return needs() if callable(needs) else (cfg.model.image_head.input, cfg.model.text_head.input)


def _dataset_for(cfg: Any, spec: DataSpec, lang: str | None) -> tuple[Any, Any]:
    """(config whose ``data`` points at the spec's dataset, loaded split)."""
    from .train.pipeline import load_split

    if spec.kind == "split":
        return cfg, load_split(cfg, spec.split, lang)
    # another dataset: the run's reader options only carry over to the same format
    options = dict(cfg.data.options) if spec.format == cfg.data.format else {}
    data = dataclasses.replace(cfg.data, format=spec.format, path=spec.path, options=options, train_options={})
    cfg2 = dataclasses.replace(cfg, data=data)
    return cfg2, load_split(cfg2, spec.split, lang)


def _batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(n, start + batch_size))


def _encode_dataset(model: Any, cfg: Any, spec: DataSpec, modality: str, lang: str | None,
                    batch_size: int, id_prefix: str, progress: bool) -> Iterator[tuple[torch.Tensor, list, list]]:
    from .progress import track
    from .train.pipeline import image_inputs, text_inputs

    cfg2, ds = _dataset_for(cfg, spec, lang)
    img_in, txt_in = _head_inputs(cfg2, model)
    base = {"dataset": ds.name, "split": spec.split}
    if modality == "image":
        ds, inputs = image_inputs(cfg2, model, ds, img_in, progress)
        n, encode = ds.num_images, model.encode_image
    else:
        inputs = text_inputs(cfg2, model, ds, txt_in, progress)
        n, encode = ds.num_texts, model.encode_text
    if n == 0:
        raise DataError(f"{spec.describe()}: no {modality}s to index")
    for idx in track(_batches(n, batch_size), f"encoding {modality}s", total=-(-n // batch_size), enabled=progress):
        vecs = encode(inputs(idx, "cpu")).float()  # (B, D)
        ids, meta = item_records(ds, idx, modality, base, id_prefix)
        yield vecs, ids, meta


def item_records(ds: Any, idx: np.ndarray, modality: str, base: dict, id_prefix: str) -> tuple[list, list]:
    """Ids and metadata that an index stores for dataset items ``idx`` (images: id and path;
    captions: id, text and the ids of their images)."""
    ids, meta = [], []
    for i in idx.tolist():
        if modality == "image":
            m = {**base, "image_id": ds.image_ids[i]}
            if ds.image_paths is not None:
                m["path"] = str(ds.image_path(i))
            ids.append(f"{id_prefix}{ds.image_ids[i]}")
        else:
            m = {**base, "text_id": ds.text_ids[i], "caption": ds.captions[i],
                 "image_ids": [ds.image_ids[j] for j in ds.gt.images_of(i).tolist()]}
            ids.append(f"{id_prefix}{ds.text_ids[i]}")
        meta.append(m)
    return ids, meta


def _pixel_tower(model: Any, what: str) -> Any:
    tower = getattr(model, "image_tower", None)
    if getattr(tower, "input_kind", None) != "pixels" or not hasattr(tower, "preprocess"):
        raise ConfigError(f"{what} needs a model that reads pixels, but this run's image tower "
                          f"({type(tower).__name__}) reads precomputed feature rows")
    return tower


def _encode_folder(model: Any, folder: Path, batch_size: int, id_prefix: str, progress: bool,
                   skipped: list[dict[str, str]]) -> Iterator[tuple[torch.Tensor, list, list]]:
    from .progress import track

    tower = _pixel_tower(model, f"indexing the image folder {folder}")
    files = list_image_files(folder)
    if not files:
        raise DataError(f"{where(folder)}no images ({', '.join(IMAGE_SUFFIXES)}) under this folder")
    for idx in track(_batches(len(files), batch_size), "encoding images", total=-(-len(files) // batch_size),
                     enabled=progress):
        pixels, ids, meta = folder_images([files[i] for i in idx.tolist()], folder, tower, id_prefix, skipped)
        if pixels:
            yield model.encode_image(torch.stack(pixels)).float(), ids, meta  # (B, 3, H, W) -> (B, D)


def folder_images(paths: list[Path], folder: Path, tower: Any, id_prefix: str,
                  skipped: list[dict[str, str]]) -> tuple[list[torch.Tensor], list[str], list[dict]]:
    """Preprocessed pixels, ids (path under ``folder``) and metadata of image files; an
    unreadable file is logged and recorded in ``skipped`` instead."""
    from .data.images import ImageLoadError, open_image

    pixels, ids, meta = [], [], []
    for path in paths:
        try:
            img = open_image(path)
        except ImageLoadError as e:
            log.warning("skipping %s: %s", e.path, e.reason)
            skipped.append({"path": e.path, "reason": e.reason})
            continue
        pixels.append(tower.preprocess(img))
        ids.append(f"{id_prefix}{path.relative_to(folder).as_posix()}")
        meta.append({"path": str(path.resolve()), "folder": str(folder.resolve())})
    return pixels, ids, meta


def check_build_args(data: "str | DataSpec", modality: str, batch_size: Any, backend: str | None) -> "DataSpec":
    """Validate what an index build is asked for; returns the parsed data spec."""
    if modality not in ("image", "text"):
        raise ConfigError(f"modality={modality!r}: choose image or text")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: must be a positive integer")
    if backend is not None and backend not in list_backends():
        raise ConfigError(f"--backend {backend!r}: choose one of {', '.join(list_backends())}")
    spec = parse_data_spec(data) if isinstance(data, str) else data
    if spec.kind == "folder" and modality == "text":
        raise ConfigError(f"--data {spec.path}: a folder of images has no captions; use --modality image")
    return spec


@torch.inference_mode()
def build_index(run: str | os.PathLike, data: str | DataSpec, out: str | os.PathLike, *,
                modality: str = "image", backend: str | None = None, add: bool = False,
                batch_size: int = 256, checkpoint: str = "best", lang: str | None = None,
                id_prefix: str | None = None, dtype: str = "float32", progress: bool = False) -> BuildResult:
    """Encode a collection with ``run``'s model into the index folder ``out``.

    ``data``: ``split:NAME``, ``FORMAT:PATH[:SPLIT]`` or a folder of images (see
    :func:`parse_data_spec`). ``modality="image"`` indexes images (for text queries),
    ``"text"`` the captions (for image queries). Dataset items get ids ``SPLIT/ITEM_ID`` (so
    splits can share an index), folder images their path relative to the folder; ``id_prefix``
    replaces that prefix. ``add=True`` appends to an existing index built by the same model.
    """
    from .models import load

    t0 = time.perf_counter()
    spec = check_build_args(data, modality, batch_size, backend)
    out = Path(out)
    ref = model_ref(run, checkpoint)

    index: Index | None = None
    if add:
        index = Index.open(out, progress=progress)
        diff = _same_model(index.model_ref, ref)
        if diff is not None:
            raise XmodalError(f"{where(out)}built by another model ({diff} differs: index has "
                              f"{(index.model_ref or {}).get(diff.split()[0])!r}); vectors of two models "
                              "cannot share an index")
        if index.modality != modality:
            raise XmodalError(f"{where(out)}is a {index.modality} index; cannot --add {modality}s to it")
        if backend is not None and backend != index.backend:
            raise XmodalError(f"{where(out)}uses the {index.backend!r} backend; --add keeps it (got --backend {backend})")
    elif (out / "manifest.json").exists():
        raise XmodalError(f"{where(out)}an index already exists here; pass --add to append to it, or choose another --out")

    model = check_embedding_model(load(ref["run"], checkpoint=ref["checkpoint"]))
    cfg = model.xmodal_config
    if spec.kind == "folder":
        prefix = id_prefix or ""
    else:
        prefix = f"{spec.split}/" if id_prefix is None else id_prefix
    skipped: list[dict[str, str]] = []
    if spec.kind == "folder":
        chunks = _encode_folder(model, Path(spec.path), batch_size, prefix, progress, skipped)
    else:
        chunks = _encode_dataset(model, cfg, spec, modality, lang or cfg.data.eval_lang, batch_size, prefix, progress)
    added = 0
    for vecs, ids, meta in chunks:
        if index is None:
            index = Index.create(out, dim=vecs.shape[1], backend=backend or "exact", modality=modality,
                                 model_ref=ref, dtype=dtype, progress=progress)
        index.add(vecs.numpy(), ids, meta)
        added += len(ids)
    if index is None or added == 0:
        raise DataError(f"{spec.describe()}: nothing could be indexed ({len(skipped)} unreadable images)")
    index.commit()
    return BuildResult(out, modality, added, len(index), skipped, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# searching


def check_k(k: Any, index: Index) -> int:
    """``k`` as an int in ``1..MAX_K``, capped at the index size."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise XmodalError(f"-k {k!r}: must be an integer between 1 and {MAX_K}")
    if len(index) == 0:
        raise XmodalError(f"{where(index.path)}the index is empty")
    return int(min(k, len(index)))


def _results(index: Index, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
    out = []
    keep = rows >= 0
    ids = index.ids_of(rows[keep])
    metas = index.metadata(rows[keep])
    for rank, (score, id_, meta) in enumerate(zip(scores[keep].tolist(), ids, metas), 1):
        rec = {"rank": rank, "score": round(float(score), 6), "id": id_}
        rec.update({k: v for k, v in meta.items() if k not in rec})
        out.append(rec)
    return out


@torch.inference_mode()
def encode_text_queries(model: EmbeddingScorer, texts: list[str]) -> np.ndarray:
    """Float32 (Q, D) L2-normalised text embeddings."""
    return model.encode_text(list(texts)).float().cpu().numpy()


@torch.inference_mode()
def encode_image_queries(model: EmbeddingScorer, paths: list[str | os.PathLike]) -> np.ndarray:
    """Float32 (Q, D) image embeddings of image files (loaded with :func:`open_image`)."""
    from .data.images import open_image

    tower = _pixel_tower(model, "an image query")
    pixels = torch.stack([tower.preprocess(open_image(p)) for p in paths])  # (Q, 3, H, W)
    return model.encode_image(pixels).float().cpu().numpy()


class Reranker:
    """A pair scorer (ADAPT, ALADIN's alignment head, a cross-encoder) re-scoring an index's
    shortlist: the index's embedding model finds the top ``k`` candidates, the pair scorer
    scores each (query, candidate) pair and orders them; the two-stage ranking of
    :func:`xmodal.eval.pairs.two_stage_ranks`, for one query.

    Candidates are re-encoded from the index's metadata (an image index needs ``path``, a text
    index ``caption``); their representations are kept in an LRU cache of ``cache_items``
    rows, so a server pays the encoding once per popular candidate. ``fusion = w`` orders by
    ``pair score + w x index score`` (default: the re-ranker run's ``eval.rerank_fusion``).
    """

    def __init__(self, model: Any, k: int = 100, cache_items: int = 4096, fusion: float | None = None) -> None:
        from .eval.pairs import check_fusion

        if not isinstance(model, PairScorer):
            raise ConfigError(f"re-ranker: {type(model).__name__} is not a pair scorer "
                              "(an embedding model's order is the index's own)")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise XmodalError(f"--rerank-k {k!r}: must be an integer between 1 and {MAX_K}")
        self.model = model.eval()
        self.k = int(k)
        if fusion is None:  # the run's own setting (eval.rerank_fusion), as xmodal eval uses it
            cfg = getattr(model, "xmodal_config", None)
            fusion = cfg.eval.rerank_fusion if cfg is not None else 0.0
        self.fusion = check_fusion(fusion, "--rerank-fusion")
        self.cache_items = int(cache_items)
        self._cache: "OrderedDict[tuple[str, int], Any]" = OrderedDict()

    def shortlist_size(self, k: int, index: Index) -> int:
        """Rows to fetch from the index for ``k`` results (at least ``k``)."""
        return int(min(max(self.k, k), len(index)))

    def _candidate_reps(self, index: Index, rows: np.ndarray) -> Any:
        from .eval.pairs import concat_reps, take_reps

        key = str(index.path)
        missing = [int(r) for r in rows.tolist() if (key, int(r)) not in self._cache]
        if missing:
            metas = index.metadata(np.asarray(missing, dtype=np.int64))
            if index.modality == "image":
                paths = []
                for row, m in zip(missing, metas):
                    if not m.get("path"):
                        raise XmodalError(f"{where(index.path)}row {row} has no image path: re-ranking "
                                          "re-encodes the shortlisted images, so the index must name their files")
                    paths.append(m["path"])
                reps = self.model.encode_image_reps(_pixels(self.model, paths, "re-ranking"))
            else:
                caps = []
                for row, m in zip(missing, metas):
                    if not m.get("caption"):
                        raise XmodalError(f"{where(index.path)}row {row} has no caption to re-rank")
                    caps.append(m["caption"])
                reps = self.model.encode_text_reps(caps)
            for j, row in enumerate(missing):
                self._cache[(key, row)] = take_reps(reps, slice(j, j + 1))
        parts = []
        for r in rows.tolist():
            self._cache.move_to_end((key, int(r)))
            parts.append(self._cache[(key, int(r))])
        while len(self._cache) > self.cache_items:
            self._cache.popitem(last=False)
        return concat_reps(parts)

    @torch.inference_mode()
    def rerank(self, index: Index, query: Any, modality: str, rows: np.ndarray, k: int,
               first_scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Re-score the shortlist ``rows`` (one query's, ``-1`` = padding) and keep the top ``k``.

        ``query`` is a text (``modality="text"``), an image path or a PIL image;
        ``first_scores``: the index's scores of ``rows`` (needed when ``fusion > 0``). Returns
        ``(scores, rows)``.
        """
        if self.fusion and first_scores is None:
            raise XmodalError("re-ranking with fusion needs the index's scores of the shortlist")
        keep = rows >= 0
        rows = rows[keep]
        if index.modality == modality:
            raise XmodalError(f"re-ranking scores image-text pairs: a {modality} query against a "
                              f"{index.modality} index has none")
        cand = self._candidate_reps(index, rows)
        if modality == "text":
            q = self.model.encode_text_reps([query])
            scores = self.model.score(cand, q)[:, 0]  # (K,) images x one text
        else:
            img = query if hasattr(query, "convert") else open_indexed_image(str(query))  # PIL or path
            q = self.model.encode_image_reps(_pixel_tower(self.model, "an image query").preprocess(img)[None])
            scores = self.model.score(q, cand)[0]  # (K,) one image x texts
        scores = scores.float().cpu().numpy()
        if self.fusion:
            scores = scores + self.fusion * np.asarray(first_scores, dtype=np.float32)[keep]
        order = np.argsort(-scores, kind="stable")[:k]
        return scores[order], rows[order]


#: how the emoji dataset's virtual image paths (``<asset folder>/emoji:/<style>/<unified>``)
#: appear in index metadata
EMOJI_MARK = "emoji:/"


def open_indexed_image(path: str) -> Any:
    """The image an index row's ``path`` names: a file, or an emoji of the packaged dataset."""
    if EMOJI_MARK in path:
        from .data import emoji

        asset, _, image_id = path.partition(EMOJI_MARK)
        return emoji.open_uri(emoji.URI_SCHEME + image_id, asset.rstrip("/\\") or "emoji")
    from .data.images import open_image

    return open_image(Path(path))


def _pixels(model: Any, paths: list[Any], what: str) -> torch.Tensor:
    tower = _pixel_tower(model, what)
    return torch.stack([tower.preprocess(open_indexed_image(str(p))) for p in paths])  # (N, 3, H, W)


def search_text(index: Index, model: EmbeddingScorer, text: str, k: int = 10,
                reranker: Reranker | None = None) -> list[dict[str, Any]]:
    """Top-``k`` rows of ``index`` for one text query: ``[{"rank", "score", "id", **metadata}]``.

    With a ``reranker``, its pair scorer re-orders the index's top ``reranker.k`` and the
    scores are the pair scorer's (plus ``reranker.fusion`` x the index's).
    """
    if not isinstance(text, str) or not text.strip():
        raise XmodalError("empty query: give some text (or --image PATH)")
    k = check_k(k, index)
    n = reranker.shortlist_size(k, index) if reranker is not None else k
    scores, rows = index.search(encode_text_queries(model, [text.strip()]), n)
    if reranker is not None:
        s, r = reranker.rerank(index, text.strip(), "text", rows[0], k, first_scores=scores[0])
        return _results(index, s, r)
    return _results(index, scores[0], rows[0])


def search_image(index: Index, model: EmbeddingScorer, image: str | os.PathLike, k: int = 10,
                 reranker: Reranker | None = None) -> list[dict[str, Any]]:
    """Top-``k`` rows of ``index`` for one image file (re-ranked as in :func:`search_text`)."""
    k = check_k(k, index)
    n = reranker.shortlist_size(k, index) if reranker is not None else k
    scores, rows = index.search(encode_image_queries(model, [image]), n)
    if reranker is not None:
        s, r = reranker.rerank(index, image, "image", rows[0], k, first_scores=scores[0])
        return _results(index, s, r)
    return _results(index, scores[0], rows[0])


# ---------------------------------------------------------------------------------------------
# retrieve-corpus (Vokenization): streamed, resumable


def corpus_signature(path: Path) -> dict[str, Any]:
    """Size, mtime and sha256 of the first MiB: detects a corpus changed between runs."""
    st = path.stat()
    with open(path, "rb") as fh:
        head = fh.read(HEAD_BYTES)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "head_sha256": hashlib.sha256(head).hexdigest()}


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + PROGRESS_SUFFIX)


def _lock(fh: Any, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: one writer assumed
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise XmodalError(f"{where(path)}another retrieve-corpus is writing this file") from None


def _sentences(fh: Any, first_line: int, corpus: Path, stats: dict[str, int]) -> Iterator[tuple[int, str, int]]:
    """(line number, text, byte offset after the line) of each non-empty line, read lazily."""
    n = first_line - 1
    for raw in fh:
        n += 1
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
            stats["bad_utf8"] += 1
            if stats["bad_utf8"] == 1:
                log.warning("%sinvalid UTF-8 replaced by U+FFFD", where(corpus, n))
        text = text.strip()
        stats["lines"] = n
        if text:
            yield n, text, fh.tell()
        else:
            stats["empty"] += 1


def _corpus_progress(enabled: bool, total_bytes: int, done_bytes: int) -> Any:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    prog = Progress(TextColumn("retrieving"), BarColumn(), TaskProgressColumn(),
                    TextColumn("{task.fields[lines]} lines  {task.fields[rate]} lines/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=True)
    task = prog.add_task("retrieve", total=max(total_bytes, 1), completed=done_bytes, lines=0, rate="-")
    return prog, task


@torch.inference_mode()
def retrieve_corpus(index: Index, model: EmbeddingScorer, corpus: str | os.PathLike, out: str | os.PathLike, *,
                    k: int = 5, batch_size: int = 256, overwrite: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Top-``k`` index rows for every non-empty line of ``corpus``, as JSON lines in ``out``.

    One line per sentence, in corpus order: ``{"line": n (1-based), "text", "ids", "scores"}``.
    The corpus is streamed in batches of ``batch_size`` sentences. After each batch the output
    is flushed and fsynced, then ``OUT.progress.json`` is atomically rewritten with the lines
    consumed, the corpus offset, the committed output bytes and the corpus signature. A rerun
    truncates the output to the committed bytes and continues from there, so an interrupted and
    resumed run writes exactly the bytes of an uninterrupted one. The sidecar is removed at the
    end. Returns a summary dict.
    """
    corpus, out = Path(corpus), Path(out)
    if not corpus.is_file():
        raise XmodalError(f"{where(corpus)}no such corpus file")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise XmodalError(f"--batch-size {batch_size!r}: must be a positive integer")
    k = check_k(k, index)
    side = progress_path(out)
    sig = corpus_signature(corpus)
    identity = {"format": PROGRESS_FORMAT, "corpus": str(corpus.resolve()), "corpus_signature": sig,
                "index": str(Path(index.path).resolve()), "index_count": len(index),
                "model_ref": index.model_ref, "k": k, "batch_size": batch_size}
    state = {"lines_consumed": 0, "corpus_offset": 0, "output_bytes": 0, "sentences": 0}
    resumed = False
    if side.is_file() and not overwrite:
        try:
            saved = json.loads(side.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{where(side)}unreadable progress file ({e}); delete it (and {out.name}) to start over") from None
        for key, want in identity.items():
            if saved.get(key) != want:
                why = "the corpus changed" if key == "corpus_signature" else f"{key} differs"
                raise XmodalError(f"{where(side)}cannot resume: {why} since the interrupted run; delete "
                                  f"{side.name} and {out.name} (or pass --overwrite) to start over")
        state = {key: int(saved[key]) for key in state}
        if not out.is_file() or out.stat().st_size < state["output_bytes"]:
            raise XmodalError(f"{where(out)}shorter than the {state['output_bytes']} bytes {side.name} "
                              "records as written; delete both to start over")
        resumed = True
    elif out.exists() and not overwrite and (not out.is_file() or out.stat().st_size > 0):
        # (an empty file is what a run killed before its first sidecar write leaves behind)
        raise XmodalError(f"{where(out)}already exists (a finished run?); pass --overwrite to replace it")

    t0 = time.perf_counter()
    resumed_from = state["lines_consumed"] + 1 if resumed else None
    resumed_line0 = state["lines_consumed"]
    stats = {"lines": state["lines_consumed"], "empty": 0, "bad_utf8": 0}
    done_sentences = state["sentences"]
    out.parent.mkdir(parents=True, exist_ok=True)
    # opened without truncating, locked, and only then cut back to the committed bytes, so a
    # second process on the same output cannot clobber the first one's file
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    with open(fd, "r+b") as dst, open(corpus, "rb") as src:
        _lock(dst, out)
        dst.truncate(state["output_bytes"])  # drop whatever an interrupted batch half-wrote
        dst.seek(state["output_bytes"])
        src.seek(state["corpus_offset"])
        atomic_write_json(side, {**identity, **state})
        prog, task = _corpus_progress(progress, sig["size"], state["corpus_offset"])
        new_sentences = 0
        with prog:
            lines = _sentences(src, state["lines_consumed"] + 1, corpus, stats)
            while True:
                batch = []
                for item in lines:
                    batch.append(item)
                    if len(batch) == batch_size:
                        break
                if not batch:
                    break
                scores, rows = index.search(encode_text_queries(model, [t for _, t, _ in batch]), k)
                ids = index.ids_of(rows)
                chunk = []
                for (n, text, _), sc, id_row in zip(batch, scores.tolist(), ids):
                    keep = [j for j, r in enumerate(id_row) if r is not None]
                    chunk.append(json.dumps({"line": n, "text": text, "ids": [id_row[j] for j in keep],
                                             "scores": [round(sc[j], 6) for j in keep]},
                                            ensure_ascii=False).translate(_LINE_BREAKS))
                dst.write(("\n".join(chunk) + "\n").encode("utf-8"))
                dst.flush()
                os.fsync(dst.fileno())
                # the commit point of this batch: the sidecar names the output bytes it covers
                state = {"lines_consumed": batch[-1][0], "corpus_offset": batch[-1][2],
                         "output_bytes": dst.tell(), "sentences": done_sentences + len(batch)}
                done_sentences += len(batch)
                new_sentences += len(batch)
                atomic_write_json(side, {**identity, **state})
                rate = (batch[-1][0] - resumed_line0) / max(time.perf_counter() - t0, 1e-9)
                prog.update(task, completed=batch[-1][2], lines=batch[-1][0], rate=f"{rate:,.0f}")
    side.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    return {"corpus": str(corpus), "out": str(out), "lines": stats["lines"], "sentences": done_sentences,
            "new_sentences": new_sentences, "resumed_from_line": resumed_from, "k": k,
            "empty_lines": stats["empty"], "bad_utf8_lines": stats["bad_utf8"], "seconds": round(seconds, 3),
            "sentences_per_s": round(new_sentences / max(seconds, 1e-9), 1), "output_bytes": out.stat().st_size}
