"""Index building split over the processes of a ``torchrun`` job.

Every process encodes a contiguous shard of the collection (cut on whole batches) and
writes its vectors, ids and metadata atomically into ``.<index>.shards/`` beside the index
folder; rank 0 then adds the shards, in order, to one :class:`~xmodal.index.Index` and
commits it (the index's own atomic manifest-last commit). The rows, ids and metadata are
those a 1-process :func:`xmodal.index.build.build_index` writes, in the same order.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from ..data.pipeline import head_inputs
from ..errors import ConfigError, DataError, XmodalError, where
from ..models.base import pixel_tower
from ..utils import atomic_write, atomic_write_json
from . import build as B
from .store import Index

log = logging.getLogger(__name__)


def shard_folder(out: Path) -> Path:
    """Where the processes leave their shards of index ``out`` (a sibling, so the index
    folder itself only ever holds what :class:`Index` writes)."""
    return out.parent / f".{out.name}.shards"


@torch.inference_mode()
def _encode_dataset_shard(model: Any, cfg: Any, spec: Any, modality: str, lang: str | None, batch_size: int,
                          id_prefix: str, progress: bool, env: Any) -> Iterator[tuple[np.ndarray, list, list]]:
    from ..progress import track
    from ..distributed import in_turns, shard_bounds
    from ..data.pipeline import image_inputs, text_inputs

    cfg2, ds = B.dataset_for(cfg, spec, lang)
    img_in, txt_in = head_inputs(cfg2, model)
    base = {"dataset": ds.name, "split": spec.split}
    # a frozen tower's feature cache is filled once, by rank 0, before the others read it
    if modality == "image":
        ds, inputs = in_turns(env, lambda: image_inputs(cfg2, model, ds, img_in, progress))
        n, encode = ds.num_images, model.encode_image
    else:
        inputs = in_turns(env, lambda: text_inputs(cfg2, model, ds, txt_in, progress))
        n, encode = ds.num_texts, model.encode_text
    if n == 0:
        raise DataError(f"{spec.describe()}: no {modality}s to index")
    lo, hi = shard_bounds(n, env, align=batch_size)
    starts = range(lo, hi, batch_size)
    captions = B.ImageCaptions(ds) if modality == "image" else None  # the same captions as build_index
    for start in track(starts, f"encoding {modality}s", total=len(starts), enabled=progress):
        idx = np.arange(start, min(start + batch_size, hi))
        vecs = encode(inputs(idx, "cpu")).float().numpy()  # (B, D)
        ids, meta = B.item_records(ds, idx, modality, base, id_prefix, captions)
        yield vecs, ids, meta


@torch.inference_mode()
def _encode_folder_shard(model: Any, folder: Path, batch_size: int, id_prefix: str, progress: bool, env: Any,
                         skipped: list[dict[str, str]]) -> Iterator[tuple[np.ndarray, list, list]]:
    from ..progress import track
    from ..distributed import shard_bounds

    tower = pixel_tower(model, f"indexing the image folder {folder}")
    files = B.list_image_files(folder)
    if not files:
        raise DataError(f"{where(folder)}no images ({', '.join(B.IMAGE_SUFFIXES)}) under this folder")
    lo, hi = shard_bounds(len(files), env, align=batch_size)
    starts = range(lo, hi, batch_size)
    for start in track(starts, "encoding images", total=len(starts), enabled=progress):
        pixels, ids, meta = B.folder_images(files[start:min(start + batch_size, hi)], folder, tower, id_prefix,
                                            skipped)
        if pixels:
            yield model.encode_image(torch.stack(pixels)).float().numpy(), ids, meta  # (B, 3, H, W) -> (B, D)


def _write_shard(folder: Path, vectors: np.ndarray, ids: list[str], meta: list[dict],
                 skipped: list[dict[str, str]]) -> None:
    """One process's rows; ``done.json`` is written last, so a shard without it is incomplete."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)

    def save_vectors(p: Path) -> None:
        with open(p, "wb") as fh:
            np.save(fh, vectors, allow_pickle=False)

    atomic_write(folder / "vectors.npy", save_vectors)
    lines = "".join(json.dumps({"id": i, "meta": m}, ensure_ascii=False) + "\n" for i, m in zip(ids, meta))
    atomic_write(folder / "rows.jsonl", lambda p: p.write_text(lines, encoding="utf-8"))
    atomic_write_json(folder / "done.json", {"rows": len(ids), "skipped": skipped})


def _read_shard(folder: Path) -> tuple[np.ndarray, list[str], list[dict], list[dict]]:
    done = folder / "done.json"
    if not done.is_file():
        raise XmodalError(f"{where(folder)}shard is incomplete (no done.json); build the index again")
    info = json.loads(done.read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    vectors = np.load(folder / "vectors.npy", allow_pickle=False)
    if len(rows) != info["rows"] or vectors.shape[0] != info["rows"]:
        raise XmodalError(f"{where(folder)}shard holds {vectors.shape[0]} vectors and {len(rows)} rows, "
                          f"done.json says {info['rows']}")
    return vectors, [r["id"] for r in rows], [r["meta"] for r in rows], info["skipped"]


def build_index_sharded(run: Any, data: Any, out: Any, *, env: Any, modality: str = "image",
                        backend: str | None = None, add: bool = False, batch_size: int = 256,
                        checkpoint: str = "best", lang: str | None = None, id_prefix: str | None = None,
                        dtype: str = "float32", progress: bool = False, device: Any = "cpu") -> Any:
    """:func:`xmodal.index.build.build_index` with the encoding split over a ``torchrun`` job.

    Every process calls it with the same arguments and ``env``
    (:class:`xmodal.distributed.DistEnv`); every process returns the
    :class:`~xmodal.index.build.BuildResult` (``added`` and ``total`` count the whole index).
    ``device`` is the process group's device (a GPU under NCCL); encoding runs on the CPU,
    as in :func:`~xmodal.index.build.build_index`.
    """
    from ..models.run import load
    from ..distributed import all_reduce_sum, barrier

    t0 = time.perf_counter()
    spec = B.check_build_args(data, modality, batch_size, backend)
    out = Path(out)
    ref = B.model_ref(run, checkpoint)
    if add:
        with Index.open(out) as existing:  # checked on every rank, before any work
            diff = B.same_model(existing.model_ref, ref)
            if diff is not None:
                raise XmodalError(f"{where(out)}built by another model ({diff} differs); vectors of two "
                                  "models cannot share an index")
            if existing.modality != modality:
                raise XmodalError(f"{where(out)}is a {existing.modality} index; cannot --add {modality}s to it")
            if backend is not None and backend != existing.backend:
                raise XmodalError(f"{where(out)}uses the {existing.backend!r} backend; --add keeps it "
                                  f"(got --backend {backend})")
    elif (out / "manifest.json").exists():
        raise XmodalError(f"{where(out)}an index already exists here; pass --add to append to it, "
                          "or choose another --out")

    run_ = B.check_embedding_model(load(ref["run"], checkpoint=ref["checkpoint"]))
    model, cfg = run_.model, run_.config
    prefix = (id_prefix or "") if spec.kind == "folder" else (f"{spec.split}/" if id_prefix is None else id_prefix)
    progress = progress and env.is_main
    skipped: list[dict[str, str]] = []
    if spec.kind == "folder":
        chunks = _encode_folder_shard(model, Path(spec.path), batch_size, prefix, progress, env, skipped)
    else:
        chunks = _encode_dataset_shard(model, cfg, spec, modality, lang or cfg.data.eval_lang, batch_size,
                                       prefix, progress, env)
    parts = list(chunks)
    vectors = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 0), np.float32)  # (n_r, D)
    ids = [i for p in parts for i in p[1]]
    meta = [m for p in parts for m in p[2]]
    shards = shard_folder(out)
    _write_shard(shards / f"{env.rank:05d}-of-{env.world_size:05d}", vectors, ids, meta, skipped)
    barrier(env)  # every shard is written

    added = total = 0
    all_skipped: list[dict[str, str]] = []
    if env.is_main:
        index = Index.open(out, progress=progress) if add else None
        for r in range(env.world_size):
            vecs, rids, rmeta, rskipped = _read_shard(shards / f"{r:05d}-of-{env.world_size:05d}")
            all_skipped += rskipped
            if not rids:
                continue
            if index is None:
                index = Index.create(out, dim=int(vecs.shape[1]), backend=backend or "exact", modality=modality,
                                     model_ref=ref, dtype=dtype, progress=progress)
            index.add(vecs, rids, rmeta)
            added += len(rids)
        if index is None or added == 0:
            shutil.rmtree(shards, ignore_errors=True)
            raise DataError(f"{spec.describe()}: nothing could be indexed ({len(all_skipped)} unreadable images)")
        index.commit()
        total = len(index)
        index.close()
        shutil.rmtree(shards, ignore_errors=True)
    # every rank reports the whole index; a failed rank 0 ends the job before this
    added = all_reduce_sum(env, added, torch.device(device))
    total = all_reduce_sum(env, total, torch.device(device))
    return B.BuildResult(out, modality, added, total, all_skipped if env.is_main else skipped,
                         time.perf_counter() - t0)
