"""``xmodal extract``: run a frozen image tower over a dataset split and store the features.

Under ``torchrun`` each process extracts a contiguous shard and rank 0 merges them into
the one feature folder (see docs/distributed.md).
"""
from __future__ import annotations

import argparse
import sys

from . import arguments, command
from .options import key_values
from ..errors import ConfigError

_SHOWN_SKIPS = 20


def _make_tower(name: str, kwargs: dict):
    import inspect

    from ..models.base import IMAGE_TOWERS
    from ..models import image as _image  # noqa: F401  (registers the image towers)

    factory = IMAGE_TOWERS.get(name)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: let it check its own arguments
        params = None
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            accepted = ", ".join(p for p in params if p not in ("self", "args")) or "(none)"
            raise ConfigError(f"image tower {name!r} takes no argument {unknown[0]!r}; it accepts: {accepted}")
    return factory(**kwargs)


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", required=True, help="dataset format (see `xmodal evaluate-embeddings --help`)")
    p.add_argument("--path", required=True, help="dataset file or folder")
    p.add_argument("--split", required=True, help="split to extract, e.g. train / val / test")
    p.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra option for the dataset reader (repeatable)")
    p.add_argument("--tower", default="efficientnet_lite0", help="registered pixel image tower")
    p.add_argument("--tower-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="argument for the tower constructor (repeatable)")
    p.add_argument("--image-size", type=int, default=None, help="input resolution, passed to the tower")
    p.add_argument("--out", required=True, help="feature folder to write (resumed if interrupted)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0,
                   help="image-decoding worker processes that run ahead of the model (0 = decode in the main process)")
    p.add_argument("--backend", choices=("auto", "eager", "torch", "jit", "onnxruntime"), default="auto",
                   help="how the tower runs: auto (default: onnxruntime if installed and 256+ images, else torch), eager (the "
                        "tower's forward), torch (BatchNorm folded, channels_last), jit, onnxruntime; see docs/extract.md")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--on-error", choices=("skip", "fail"), default="skip",
                   help="an unreadable image is skipped and reported (default) or stops the run")
    p.add_argument("--no-grid", action="store_true", help="store pooled vectors only, not the token grid")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images above this many pixels (default 64,000,000; 0 = no limit of ours)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing or partial result in --out made from other inputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("extract", help="Extract image features with a frozen tower into a resumable feature folder.")
@arguments(_args)
def run(args: argparse.Namespace) -> int:
    # the arguments first, then the dataset (cheap), then torch, the tower and the extraction
    data_kwargs = key_values(args.data_arg, "--data-arg")
    tower_kwargs = key_values(args.tower_arg, "--tower-arg")
    if args.image_size is not None:
        tower_kwargs["image_size"] = args.image_size
    from ..data.base import load_dataset

    dataset = load_dataset(args.format, args.path, args.split, **data_kwargs)
    from ..data.images import DEFAULT_MAX_PIXELS
    from ..data.features import extract_features, extract_features_sharded
    from ..distributed import env_from_environ, session

    tower = _make_tower(args.tower, tower_kwargs)
    spec = {"name": args.tower, **tower_kwargs}
    if isinstance(getattr(tower, "image_size", None), int):
        spec.setdefault("image_size", tower.image_size)  # pin the default, so a changed default never reuses
    max_pixels = DEFAULT_MAX_PIXELS if args.max_pixels is None else (args.max_pixels or None)
    options = dict(tower_spec=spec, batch_size=args.batch_size, on_error=args.on_error, grid=not args.no_grid,
                   dtype=args.dtype, num_workers=args.workers, progress=not args.no_progress, backend=args.backend,
                   max_pixels=max_pixels, overwrite=args.overwrite)
    if env_from_environ().enabled:  # launched by torchrun: one shard per process, merged by rank 0
        with session(args.device) as (env, device):
            if env.is_main:
                print(f"extracting {dataset.summary()} with {args.tower} into {args.out} "
                      f"({env.world_size} processes)", file=sys.stderr)
            fs = extract_features_sharded(dataset, tower, args.out, env=env, device=device, **options)
        if not env.is_main:
            return 0
    else:
        print(f"extracting {dataset.summary()} with {args.tower} into {args.out}", file=sys.stderr)
        fs = extract_features(dataset, tower, args.out, device=args.device, **options)
    skipped = fs.skipped
    grid = f", grid {list(fs.grid.shape)}" if fs.grid is not None else ""
    backend = fs.manifest.get("inputs", {}).get("backend", "eager")
    print(f"features for {fs.num_images} images in {fs.path} (pooled {list(fs.pooled.shape)}{grid}, "
          f"{fs.pooled.dtype}, backend {backend})")
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s), stored as zero rows with valid=False:")
        for s in skipped[:_SHOWN_SKIPS]:
            print(f"  {s['path']}: {s['reason']}")
        if len(skipped) > _SHOWN_SKIPS:
            print(f"  ... and {len(skipped) - _SHOWN_SKIPS} more, all listed in {fs.path / 'manifest.json'}")
    return 0
