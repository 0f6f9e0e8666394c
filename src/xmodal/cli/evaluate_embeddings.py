"""``xmodal evaluate-embeddings``: exact retrieval metrics of saved embeddings.

    xmodal evaluate-embeddings IMAGES.npy TEXTS.npy --text-to-image MAP [--protocol P]
        [--json] [--block-size B] [--device D] [--dtype fp32|bf16] [--seed S]

``MAP`` is a ``.npy`` 1-D integer array (the image of each text) or a ``.json`` list whose
entries are an image index or a list of image indices (one entry per text).

The table is ``xmodal eval``'s (:func:`xmodal.eval.report.print_metrics`). Nothing heavy is
imported at module level or while building the parser (numpy, torch and the metrics engine come
in the functions that use them), so ``xmodal --help`` stays light.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import DataError, where
from . import arguments, command


#: ``xmodal.eval.metrics.DEFAULT_BLOCK_SIZE``, repeated so that building the parser imports no torch
#: (a test checks that the two agree)
DEFAULT_BLOCK_SIZE = 1024


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", metavar="IMAGES.npy", help="image embeddings, N x D float array")
    p.add_argument("texts", metavar="TEXTS.npy", help="text embeddings, M x D float array")
    p.add_argument("--text-to-image", "-m", dest="text_to_image", metavar="MAP", required=True,
                   help=".npy 1-D int array (image of each text) or .json list of lists of image indices")
    p.add_argument("--protocol", "-p", default="full",
                   help="full, coco1k, coco5k, f30k1k, recipe1k or recipe10k (default: full)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                   help=f"image rows scored per block (memory ~ B x M x 8 bytes; default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="matrix product dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the recipe1k / recipe10k subsets (default 0)")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def load_npy(path: str | Path, what: str) -> Any:
    """Memory-map a ``.npy`` file without pickles; errors name the file."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise DataError(where(path) + f"{what}: no such file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise DataError(where(path) + f"cannot read {what}: {_one_line(exc)}") from None
    if magic != b"\x93NUMPY":
        raise DataError(where(path) + f"{what}: not a .npy file (bad header)")
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        if "object" in str(exc).lower():
            raise DataError(where(path) + f"{what}: holds Python objects; xmodal never loads pickles") from None
        raise DataError(where(path) + f"cannot read {what} as .npy: {_one_line(exc)}") from None
    except (OSError, EOFError) as exc:
        raise DataError(where(path) + f"cannot read {what} as .npy: {_one_line(exc)}") from None
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise DataError(where(path) + f"{what}: expected a single .npy array, got an archive")
    return arr


def load_text_to_image(path: str | Path) -> Any:
    """Read MAP: ``.npy`` (1-D ints) or ``.json`` (list of ints / lists of ints)."""
    import numpy as np

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = load_npy(path, "text-to-image map")
        if arr.ndim != 1:
            raise DataError(where(path) + f"text-to-image map must be 1-D, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise DataError(where(path) + f"text-to-image map must hold integers, got dtype {arr.dtype}")
        return np.asarray(arr)
    if suffix == ".json":
        if not path.is_file():
            raise DataError(where(path) + "text-to-image map: no such file")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataError(where(path, exc.lineno) + f"invalid JSON: {exc.msg}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(where(path) + f"cannot read text-to-image map: {_one_line(exc)}") from None
        except (ValueError, RecursionError) as exc:  # a number over 4300 digits, nesting too deep
            from ..data.table import json_failure_reason

            raise DataError(where(path) + f"invalid JSON: {json_failure_reason(exc)}") from None
        if not isinstance(data, list):
            raise DataError(where(path) + "text-to-image map must be a JSON list (one entry per text)")
        return data
    raise DataError(where(path) + "text-to-image map must be a .npy or .json file")


@command("evaluate-embeddings", help="Exact Recall@K / medR / meanR / rsum of saved image and text embeddings.")
@arguments(_args)
def run(args: argparse.Namespace) -> int:
    from ..eval.metrics import METRIC_KEYS
    from ..eval.protocols import evaluate_protocol

    images = load_npy(args.images, "image embeddings")
    texts = load_npy(args.texts, "text embeddings")
    mapping = load_text_to_image(args.text_to_image)
    names = (f"{args.images} (image embeddings)", f"{args.texts} (text embeddings)",
             f"{args.text_to_image} (text-to-image map)")
    result = evaluate_protocol(images, texts, mapping, args.protocol, block_size=args.block_size,
                               device=args.device, dtype=args.dtype, seed=args.seed, names=names)
    metrics = {k: float(result.metrics[k]) for k in METRIC_KEYS}
    if args.json:
        print(json.dumps(metrics))
    else:
        n, m = images.shape[0], texts.shape[0]
        folds = f", mean of {len(result.subsets)} subsets" if len(result.subsets) > 1 else ""
        from ..eval.report import print_metrics

        print_metrics(metrics, title=f"{args.protocol}: {n} images x {m} texts{folds}")
    return 0
