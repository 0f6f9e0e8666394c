"""Several processes (gloo on CPU): one step equals one process's step on the same global
batch, torchrun training matches 1-process training and resumes with another world size,
sharded feature extraction and index building equal their 1-process results."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.numpy import load_file
from torch import nn

from image_fixtures import PoolPixelTower, write_corrupt_png, write_ok
from train_fixtures import write_synthetic_precomp, write_tiny_config
from xmodal.config import load_config
from xmodal.data.base import CrossModalDataset, GroundTruth
from xmodal.errors import ConfigError
from xmodal.data.features import FeatureSet, extract_features, extract_features_sharded
from xmodal.index import Index
from xmodal.losses import create_loss
from xmodal.models.adapt import Adapt
from xmodal.models.base import EmbeddingScorer, TowerOutput
from xmodal.index.build import build_index
from xmodal.data.inputs import Batch, BatchOrder
from xmodal.distributed import DistEnv, env_from_environ, session, shard_bounds
from xmodal.train.ddp import GatheringModel, ShardedBatchOrder, data_parallel
from xmodal.train.loop import train
from xmodal.train.tasks import build_task

WORLD = 2
B = 8  # global batch
# image of each row: image 3 sits on both ranks, image 1 twice; rows of one image are each other's positives
IMAGE_IDX = np.array([0, 1, 2, 3, 3, 4, 1, 5])
LOSSES = [("infonce", {}), ("hinge", {"max_violation": False}), ("hinge", {"max_violation": True}),
          ("hinge", {"max_violation": True, "reduction": "mean"}), ("adapt_hinge", {}), ("siglip", {}),
          ("triplet", {"intra_modal": True})]


class ToyDual(EmbeddingScorer):
    """Two linear encoders (float64, so tolerances can be tight) and a parameter no step uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.img = nn.Linear(6, 5).double()
        self.txt = nn.Linear(4, 5).double()
        self.unused = nn.Linear(2, 2).double()

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(self.img(x), dim=-1)

    def encode_text(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.normalize(self.txt(x), dim=-1)


def FakePixelTower() -> PoolPixelTower:  # noqa: N802 - the tower these tests were written with
    return PoolPixelTower(dim=6, weights="sin")


def _pos_mask() -> torch.Tensor:
    return torch.from_numpy(IMAGE_IDX[:, None] == IMAGE_IDX[None, :])  # (B_img, B_txt)


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for k, p in module.named_parameters() if p.requires_grad}


def _one_step(model: nn.Module, loss: nn.Module, images, texts, step_fn=None) -> tuple[float, dict, dict]:
    """Run one training step and backward; return (loss, model grads, loss grads)."""
    batch = Batch(np.arange(B), IMAGE_IDX, _pos_mask(), images, texts)
    losses, _ = step_fn(batch, 3)
    total = sum(losses.values())
    total.backward()
    return float(total), _grads(model), _grads(loss)


def _assert_same(ref: tuple, got: tuple, what: str, rtol: float) -> None:
    assert got[0] == pytest.approx(ref[0], rel=rtol), f"{what}: loss {got[0]} != {ref[0]}"
    for part in (1, 2):
        for k in ref[part]:
            torch.testing.assert_close(got[part][k].double(), ref[part][k].double(), rtol=rtol, atol=rtol,
                                       msg=lambda m: f"{what}: gradient of {k}: {m}")


def _check_contrastive(env: DistEnv, device: torch.device) -> None:
    g = torch.Generator().manual_seed(1)
    img_rows = torch.randn(6, 6, generator=g, dtype=torch.float64)[IMAGE_IDX]  # (B, 6) duplicates share inputs
    txt = torch.randn(B, 4, generator=g, dtype=torch.float64)
    mine = slice(env.rank * B // WORLD, (env.rank + 1) * B // WORLD)
    for name, args in LOSSES:
        model, loss = ToyDual(), create_loss(name, **args)
        ref = _one_step(model, loss, img_rows, txt, build_task(model, loss).training_step)
        model, loss = ToyDual(), create_loss(name, **args)
        step = data_parallel(build_task(GatheringModel(model, env), loss), env, device)
        got = _one_step(model, loss, img_rows[mine], txt[mine], step)
        _assert_same(ref, got, f"{name} {args}", rtol=1e-9)


def _ragged_words(words: torch.Tensor, mask: torch.Tensor) -> TowerOutput:
    """Tokens padded only to the longest caption of this slice, as a text tower would."""
    n = int(mask.sum(1).max())
    w = words[:, :n]  # (b, n, D)
    return TowerOutput(w, w.mean(1), mask[:, :n])


def _check_pair_scorer(env: DistEnv, device: torch.device) -> None:
    g = torch.Generator().manual_seed(2)
    regions = torch.randn(6, 3, 6, generator=g, dtype=torch.float64)[IMAGE_IDX]  # (B, R, D)
    rmask = torch.ones(B, 3, dtype=torch.bool)
    rmask[2, 2:] = False
    words = torch.randn(B, 5, 6, generator=g, dtype=torch.float64)  # (B, L, D)
    lengths = torch.tensor([2, 3, 1, 3, 5, 2, 4, 3])  # rank 0's captions are all shorter than rank 1's longest
    wmask = torch.arange(5)[None, :] < lengths[:, None]  # (B, L)
    images = TowerOutput(regions, regions.mean(1), rmask)
    mine = slice(env.rank * B // WORLD, (env.rank + 1) * B // WORLD)
    local_images = TowerOutput(regions[mine], regions[mine].mean(1), rmask[mine])
    for direction in ("t2i", "i2t"):
        def make() -> tuple[nn.Module, nn.Module]:
            torch.manual_seed(0)
            return (Adapt(None, None, 6, direction=direction, normalization="none", fused="eager").double(),
                    create_loss("hinge", max_violation=True))
        model, loss = make()
        ref = _one_step(model, loss, images, TowerOutput(words, words.mean(1), wmask),
                        build_task(model, loss).training_step)
        model, loss = make()
        step = data_parallel(build_task(GatheringModel(model, env), loss), env, device)
        got = _one_step(model, loss, local_images, _ragged_words(words[mine], wmask[mine]), step)
        _assert_same(ref, got, f"ADAPT-{direction}", rtol=1e-9)


def _image_dataset(folder: Path) -> CrossModalDataset:
    paths = sorted(p.name for p in folder.iterdir())
    n = len(paths)
    return CrossModalDataset(name="toy", split="test", image_ids=[p.split(".")[0] for p in paths],
                             text_ids=[f"t{i}" for i in range(n)], captions=[f"caption {i}" for i in range(n)],
                             gt=GroundTruth.from_map(np.arange(n), n), image_paths=paths, root=folder)


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with session("cpu") as (env, device):
        _check_contrastive(env, device)
        _check_pair_scorer(env, device)
        ds = _image_dataset(Path(tmp) / "images")
        fs = extract_features_sharded(ds, FakePixelTower(), Path(tmp) / "sharded", env=env, batch_size=2,
                                      dtype="float32", progress=False)
        assert fs.num_images == ds.num_images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    """Loss and gradients of one step, for every loss and a pair scorer; sharded extraction."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(9):
        write_corrupt_png(images / f"im{i}.png") if i == 5 else write_ok(images / f"im{i}.png", seed=i)
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    single = extract_features(_image_dataset(images), FakePixelTower(), tmp_path / "single", batch_size=2,
                              dtype="float32", progress=False)
    sharded = FeatureSet.open(tmp_path / "sharded", verify=True)
    assert not (tmp_path / "sharded" / ".shards").exists() and not (tmp_path / "sharded" / ".partial").exists()
    assert sharded.ids == single.ids and sharded.valid.tolist() == single.valid.tolist()
    assert [s["index"] for s in sharded.skipped] == [s["index"] for s in single.skipped] == [5]
    np.testing.assert_array_equal(sharded.pooled, single.pooled)
    np.testing.assert_array_equal(sharded.grid, single.grid)
    assert sharded.manifest["inputs"] == single.manifest["inputs"]


def _weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "best" / "model.safetensors"))


def _val(run: Path) -> list[float]:
    return [r["rsum"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]


def test_torchrun_training_matches_one_process_and_resumes_with_one(tmp_path):
    data = write_synthetic_precomp(tmp_path / "data")
    cfg = write_tiny_config(tmp_path / "c.yaml", data, steps=30)
    overrides = ["train.eval_every=10", "train.keep_checkpoints=5"]
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(WORLD), "-m", "xmodal", "train", str(cfg), "--out", str(two), "--no-progress",
                           *overrides], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes, global batch 16 (8 per process)" in proc.stderr
    assert json.loads((two / "summary.json").read_text())["world_size"] == WORLD

    one = tmp_path / "one"
    train(load_config(cfg, overrides), one, progress=False)
    assert _val(two) == pytest.approx(_val(one), abs=1e-6)
    w1, w2 = _weights(one), _weights(two)
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], atol=1e-5, err_msg=k)

    # the 2-process run, stopped after step 10, resumed by one process
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(two / "config.yaml", resumed / "config.yaml")
    shutil.copytree(two / "checkpoints" / "step_0000010", resumed / "checkpoints" / "step_0000010")
    (resumed / "checkpoints" / "latest.json").write_text(json.dumps({"step": 10, "dir": "step_0000010"}))
    summary = train(load_config(cfg, overrides), resumed, resume=True, progress=False)
    assert summary["steps"] == 30 and summary["world_size"] == 1
    w3 = _weights(resumed)
    for k in w2:
        np.testing.assert_allclose(w3[k], w2[k], atol=1e-5, err_msg=k)

    # sharded index building: 2 processes write the index 1 process writes (batches of 16 over 80 captions)
    idx2 = tmp_path / "idx2"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(WORLD), "-m", "xmodal", "index", str(one), "--data", "split:test", "--modality",
                           "text", "--batch-size", "16", "--out", str(idx2), "--json"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["total"] == 80
    assert not (tmp_path / ".idx2.shards").exists()
    build_index(one, "split:test", tmp_path / "idx1", modality="text", batch_size=16)
    with Index.open(idx2) as a, Index.open(tmp_path / "idx1") as b:
        assert len(a) == len(b) == 80
        assert a.ids_of(np.arange(80)) == b.ids_of(np.arange(80))
        assert a.metadata(np.arange(80)) == b.metadata(np.arange(80))
        np.testing.assert_allclose(np.stack([a.vector(r) for r in range(80)]),
                                   np.stack([b.vector(r) for r in range(80)]), atol=1e-6)


def test_shards_and_layout():
    for n in (0, 1, 7, 64, 65):
        for world in (1, 2, 3):
            for align in (1, 4):
                cuts = [shard_bounds(n, DistEnv(rank=r, world_size=world), align) for r in range(world)]
                assert cuts[0][0] == 0 and cuts[-1][1] == n
                assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
                assert all(lo % align == 0 for lo, hi in cuts if hi > lo)
    order = BatchOrder(GroundTruth.from_map(np.arange(40) // 2, 20), 8, seed=3)
    parts = [ShardedBatchOrder(order, DistEnv(rank=r, world_size=4)).batch(7) for r in range(4)]
    text_idx, image_idx = order.batch(7)
    assert all((p[0] == text_idx).all() and (p[1] == image_idx).all() for p in parts)
    assert np.concatenate([text_idx[p[2]] for p in parts]).tolist() == text_idx.tolist()
    with pytest.raises(ConfigError, match="train.batch_size=8 .* 3 processes"):
        ShardedBatchOrder(order, DistEnv(rank=0, world_size=3))
    assert not env_from_environ({}).enabled
    with pytest.raises(ConfigError, match="MASTER_ADDR"):
        env_from_environ({"WORLD_SIZE": "2", "RANK": "1"})
    with pytest.raises(ConfigError, match="RANK=2"):
        env_from_environ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"})
