"""Small shared helpers: atomic writes, the cache folder, seeding, device selection.

Nothing heavy at import: the config path (``xmodal.config.save``) imports this module, and the
command line must start without numpy or torch.
"""
from __future__ import annotations

import json
import os
import random
import secrets
from pathlib import Path
from typing import Any, Callable


def cache_dir() -> Path:
    """xmodal's cache folder: ``$XMODAL_CACHE``, else ``$XDG_CACHE_HOME/xmodal``, else ``~/.cache/xmodal``.

    Frozen-tower outputs live under it (``features/``, ``text/``). As the XDG base directory
    specification says, an empty or relative ``XDG_CACHE_HOME`` is ignored.
    """
    own = os.environ.get("XMODAL_CACHE")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "xmodal"
    return Path.home() / ".cache" / "xmodal"


def _create_temp_beside(path: Path) -> tuple[Path, int]:
    """A new empty file ``.NAME.XXXX.tmp`` beside ``path`` and its permission bits: those a plain
    ``open(path, "w")`` gives a new file (0666 less the umask, as the kernel applies it;
    ``tempfile.mkstemp`` would make it 0600)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        try:
            return tmp, os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
    raise FileExistsError(f"{path.parent}: cannot create a temporary file beside {path.name}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The file gets the permissions of any file the user creates (their umask applies), not the
    owner-only ones of a ``tempfile`` file, also when ``write`` replaces the file with one of
    its own (``safetensors`` writes 0600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _create_temp_beside(path)
    try:
        write(tmp)
        if tmp.stat().st_mode & 0o777 != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    import numpy as np  # here: only numpy values get this far, so numpy is loaded already

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; called by the trainer, never at import."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> "torch.device":
    import torch

    from .errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r}: CUDA is not available on this machine")
    return dev
