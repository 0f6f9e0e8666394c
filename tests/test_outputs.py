"""Where caches go (``XMODAL_CACHE``, ``XDG_CACHE_HOME``) and the permissions outputs get (the umask's)."""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from train_fixtures import write_synthetic_precomp, write_tiny_config


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# caches ------------------------------------------------------------------------------------
def test_cache_root_honours_xdg_cache_home(tmp_path, monkeypatch):
    from xmodal.data.features import default_cache_root
    from xmodal.data.pipeline import cache_root
    from xmodal.utils import cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XMODAL_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == cache_root() == tmp_path / "home" / ".cache" / "xmodal"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == cache_root() == tmp_path / "xdg" / "xmodal"
    assert default_cache_root() == tmp_path / "xdg" / "xmodal" / "features"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: relative paths are ignored
    assert cache_root() == tmp_path / "home" / ".cache" / "xmodal"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XMODAL_CACHE", str(tmp_path / "own"))  # xmodal's own variable wins
    assert cache_root() == tmp_path / "own" and default_cache_root() == tmp_path / "own" / "features"
    monkeypatch.setenv("XMODAL_CACHE", "")  # empty = unset, never the working directory
    assert cache_root() == tmp_path / "xdg" / "xmodal"


class _CountingTextTower(nn.Module):
    """A frozen text tower: pooled = [length, number of words] of each caption."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def tokenize(self, captions):
        return captions

    def forward(self, captions):
        from xmodal.models.base import TowerOutput

        pooled = torch.tensor([[len(c), len(c.split())] for c in captions], dtype=torch.float32)
        return TowerOutput(tokens=pooled[:, None], pooled=pooled, mask=None)


def test_text_cache_is_written_under_xdg_cache_home(tmp_path, monkeypatch):
    from xmodal.config import TowerConfig
    from xmodal.data.pipeline import encode_texts_cached

    monkeypatch.delenv("XMODAL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = encode_texts_cached(_CountingTextTower(), TowerConfig("counting", {}), ["a cat", "two red dogs"],
                              tokens=False, progress=False)
    assert np.asarray(out.pooled).tolist() == [[5, 2], [12, 3]]
    files = list((tmp_path / "xdg" / "xmodal" / "text").glob("*.safetensors"))
    assert len(files) == 1


# permissions -------------------------------------------------------------------------------
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_respect_the_umask(tmp_path, mask, expected):
    from safetensors.numpy import save_file

    from xmodal.config import Config, save
    from xmodal.utils import atomic_write, atomic_write_json, atomic_write_text

    with umask(mask):
        atomic_write_json(tmp_path / "metrics.json", {"r1": np.float32(1.5), "n": np.int64(3)})
        atomic_write_text(tmp_path / "notes.txt", "hello\n")
        save(Config(), tmp_path / "config.yaml")
        # safetensors writes 0600 files of its own: the umask's mode still wins
        atomic_write(tmp_path / "a.safetensors", lambda p: save_file({"x": np.zeros(2, np.float32)}, str(p)))
    for name in ("metrics.json", "notes.txt", "config.yaml", "a.safetensors"):
        assert mode(tmp_path / name) == expected, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "config.yaml", "metrics.json",
                                                          "notes.txt"]  # no temporary file left


def test_atomic_write_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    from xmodal.utils import atomic_write, atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "old\n")

    def broken(p: Path) -> None:
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.txt", broken)
    assert (tmp_path / "a.txt").read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_run_outputs_get_the_umask_mode(tmp_path, mask, expected):
    """A trained run's JSON / YAML outputs (config.yaml, summary.json, metrics.jsonl, the best
    checkpoint's state) are as readable as the user's other files."""
    from xmodal.config import load_config
    from xmodal.train.loop import train

    data = write_synthetic_precomp(tmp_path / "data", sizes=(("train", 40), ("dev", 10), ("test", 10)))
    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", data, steps=4), ["train.eval_every=4"])
    with umask(mask):
        train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for rel in ("config.yaml", "summary.json", "metrics.jsonl", "best/state.json", "best/config.yaml"):
        assert mode(run / rel) == expected, rel
