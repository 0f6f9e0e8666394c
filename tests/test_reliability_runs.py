"""Run folders: bad inputs give one clear ``XmodalError`` naming the file, never a traceback.

1. every checkpoint folder (``best/``, ``checkpoints/step_*/``) carries ``manifest.json`` (size and
   sha256 of each file); loading (``load``, ``checkpoint_dir``, ``load_weights_file``) and resuming
   (``restore_checkpoint``) check it and name the damaged file; runs from before manifests load.
2. a truncated, empty or garbage ``model.safetensors`` and a tensor of the wrong shape name the file
   (and the tensor, with both shapes).
3. config values out of range (``train.batch_size=0``, ``optim.lr=.nan``, ...) are refused by
   ``load_config`` with the dotted key and the value, before any work.
4. ``xmodal eval`` of a missing folder says so; of a folder holding one run (the demo's output
   folder) names the run inside.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from train_fixtures import write_synthetic_precomp, write_tiny_config  # noqa: E402

from xmodal.cli import main  # noqa: E402
from xmodal.config import load_config, to_dict  # noqa: E402
from xmodal.errors import ConfigError, XmodalError  # noqa: E402
from xmodal.losses import create_loss  # noqa: E402
from xmodal.models import create_model, load  # noqa: E402
from xmodal.models.run import checkpoint_dir, load_weights_file, model_state  # noqa: E402
from xmodal.train.checkpoint import restore_checkpoint, save_best, save_checkpoint  # noqa: E402
from xmodal.utils import atomic_write_text  # noqa: E402

STEP = 3


def _tiny_cfg(root: Path, embed_dim: int = 32):
    from xmodal.models.text.bigru import train_tokenizer

    data = write_synthetic_precomp(root / "data", sizes=(("train", 8), ("dev", 4), ("test", 4)))
    cfg = load_config(write_tiny_config(root / "tiny.yaml", data), [f"model.embed_dim={embed_dim}"])
    cfg.model.text.args["tokenizer_json"] = train_tokenizer(["a red circle", "blue star"], vocab_size=30)
    return cfg


def _training_parts(cfg):
    torch.manual_seed(0)
    model = create_model(cfg.model)
    loss = create_loss(cfg.loss.name, **cfg.loss.args)
    params = [p for p in list(model.parameters()) + list(loss.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    return model, loss, optimizer


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A run folder as training writes it (config.yaml, best/, checkpoints/step_*/), untouched."""
    root = tmp_path_factory.mktemp("reliability_runs")
    cfg = _tiny_cfg(root)
    model, loss, optimizer = _training_parts(cfg)
    sum(p.sum() for p in model.parameters()).backward()
    optimizer.step()  # the optimizer has state to save
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    run = root / "run"
    run.mkdir()
    atomic_write_text(run / "config.yaml", text)
    save_best(run, STEP, model, {"rsum": 1.0}, text)
    save_checkpoint(run, STEP, model, loss, optimizer, {"best_rsum": 1.0}, text)
    return run


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    """A fresh copy of the run folder, free to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "run"))


def _step_dir(run: Path) -> Path:
    return run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["dir"]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # in the tensor data, after the header: safetensors alone cannot see it
    path.write_bytes(bytes(data))


def _drop_manifests(run: Path) -> None:
    for m in run.rglob("manifest.json"):
        m.unlink()


def _resume(run: Path) -> dict:
    cfg = load_config(_step_dir(run) / "config.yaml")
    model, loss, optimizer = _training_parts(cfg)
    return restore_checkpoint(_step_dir(run), model, loss, optimizer)


# ------------------------------------------------------------------------------------------
# 1. manifests
def test_every_checkpoint_folder_has_a_manifest_of_its_files(run):
    for folder in (run / "best", _step_dir(run)):
        manifest = json.loads((folder / "manifest.json").read_text())
        names = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
        assert sorted(manifest["files"]) == names
        for name, rec in manifest["files"].items():
            data = (folder / name).read_bytes()
            assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not list(run.rglob(".tmp-*")) and not list(run.rglob(".old-*"))


def test_flipped_bit_in_best_weights_is_named_by_every_loader(run):
    _flip_last_byte(run / "best" / "model.safetensors")
    expected = r"best/model\.safetensors: checksum mismatch \(damaged or modified since it was written\)"
    with pytest.raises(XmodalError, match=expected):
        load(run)
    with pytest.raises(XmodalError, match=expected):
        checkpoint_dir(run)
    cfg = load_config(run / "best" / "config.yaml")
    with pytest.raises(XmodalError, match=expected):
        load_weights_file(create_model(cfg.model), run / "best" / "model.safetensors")


@pytest.mark.parametrize("name", ["model.safetensors", "train.safetensors", "loss.safetensors", "state.json",
                                  "config.yaml"])
def test_flipped_bit_in_a_checkpoint_is_named_on_resume(run, name):
    _flip_last_byte(_step_dir(run) / name)
    with pytest.raises(XmodalError, match=rf"{_step_dir(run).name}/{name}: checksum mismatch"):
        restore_checkpoint(_step_dir(run), *_training_parts(load_config(run / "config.yaml")))
    with pytest.raises(XmodalError, match=rf"{_step_dir(run).name}/{name}: checksum mismatch"):
        load(run, checkpoint="latest")


def test_cli_resume_of_a_damaged_checkpoint_names_the_file(tmp_path, capsys):
    data = write_synthetic_precomp(tmp_path / "data", sizes=(("train", 8), ("dev", 4), ("test", 4)))
    cfg = write_tiny_config(tmp_path / "c.yaml", data, steps=4)
    args = ["--no-progress", "train.batch_size=8", "train.eval_every=2"]
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), *args, "train.steps=2"]) == 0
    _flip_last_byte(_step_dir(run) / "model.safetensors")
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(run), "--resume", *args, "train.steps=2"]) == 2
    err = capsys.readouterr().err
    assert f"{_step_dir(run).name}/model.safetensors: checksum mismatch" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_truncated_or_missing_file_is_named(run):
    weights = run / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(XmodalError, match=r"best/model\.safetensors: size mismatch: 100 bytes, manifest\.json "
                                          r"records \d+ \(truncated"):
        load(run)
    weights.unlink()
    with pytest.raises(XmodalError, match=r"best/model\.safetensors: missing \(listed in manifest\.json\)"):
        load(run)


def test_unreadable_manifest_is_named(run):
    (run / "best" / "manifest.json").write_text("{not json")
    with pytest.raises(XmodalError, match=r"best/manifest\.json: not valid JSON"):
        load(run)
    (run / "best" / "manifest.json").write_text(json.dumps({"format": "xmodal-checkpoint", "format_version": 1,
                                                            "files": {"../config.yaml": {"size": 1, "sha256": "x"}}}))
    with pytest.raises(XmodalError,
                       match=r"best/manifest\.json \[files\]: '\.\./config\.yaml' is not a file of this folder"):
        load(run)


def test_a_file_changed_on_purpose_is_recorded_with_write_manifest(run):
    from xmodal.train.checkpoint import write_manifest

    config = run / "best" / "config.yaml"
    config.write_text(config.read_text().replace("name: tiny", "name: renamed"))
    with pytest.raises(XmodalError, match=r"best/config\.yaml: size mismatch"):
        load(run)
    write_manifest(run / "best")
    assert load(run).config.name == "renamed"


def test_run_without_manifests_still_loads_and_resumes_quietly(run, caplog):
    _drop_manifests(run)
    with caplog.at_level(logging.INFO):
        loaded = load(run)
        assert loaded.step == STEP
        assert _resume(run)["step"] == STEP
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_remembered_checksums_notice_a_rewrite(run, monkeypatch):
    import time

    from xmodal.models import run as run_module

    monkeypatch.setattr(run_module, "_SETTLED_S", -1.0)  # remember every digest at once
    assert load(run).step == STEP
    time.sleep(0.05)  # past the file clock's resolution
    _flip_last_byte(run / "best" / "model.safetensors")
    with pytest.raises(XmodalError, match=r"best/model\.safetensors: checksum mismatch"):
        load(run)


# ------------------------------------------------------------------------------------------
# 2. corrupt or mismatched weights
@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_corrupt_weights_file_is_a_clear_error(run, damage):
    _drop_manifests(run)  # a run from before manifests: safetensors' own checks are all there is
    weights = run / "best" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00" * 64}[damage])
    with pytest.raises(XmodalError, match=r"best/model\.safetensors: not a readable safetensors file \("):
        load(run)


def test_corrupt_optimizer_state_is_a_clear_error_on_resume(run):
    _drop_manifests(run)
    (_step_dir(run) / "train.safetensors").write_bytes(b"")
    with pytest.raises(XmodalError, match=r"train\.safetensors: not a readable safetensors file"):
        _resume(run)
    (_step_dir(run) / "state.json").write_text("{")
    with pytest.raises(XmodalError, match=r"state\.json: not valid JSON"):
        _resume(run)


def test_wrong_shape_tensor_names_the_tensor_and_both_shapes(run, tmp_path):
    small = create_model(_tiny_cfg(tmp_path / "small", embed_dim=16).model)
    path = tmp_path / "model.safetensors"
    save_file(model_state(small), str(path))
    cfg = load_config(run / "best" / "config.yaml")
    with pytest.raises(XmodalError, match=r"model\.safetensors: tensor '[\w.]+' has shape \(16, \d+\), "
                                          r"the model expects \(32, \d+\)"):
        load_weights_file(create_model(cfg.model), path)
    # the same through load(): a run folder whose weights are from another config
    _drop_manifests(run)
    shutil.copy(path, run / "best" / "model.safetensors")
    with pytest.raises(XmodalError, match=r"best/model\.safetensors: tensor '[\w.]+' has shape"):
        load(run)


def test_weights_with_missing_tensor_are_named(run):
    _drop_manifests(run)
    weights = run / "best" / "model.safetensors"
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(weights))
    with pytest.raises(XmodalError, match=rf"best/model\.safetensors: .*missing: \['{dropped}'\]"):
        load(run)


# ------------------------------------------------------------------------------------------
# 4. which folder
def test_missing_run_folder_says_no_such_folder(tmp_path, capsys):
    with pytest.raises(XmodalError, match=r"does_not_exist: no such folder"):
        load(tmp_path / "does_not_exist")
    assert main(["eval", str(tmp_path / "does_not_exist")]) == 2
    err = capsys.readouterr().err
    assert "does_not_exist: no such folder" in err and len(err.strip().splitlines()) == 1


def test_folder_holding_one_run_names_it(pristine, tmp_path, capsys):
    demo = tmp_path / "demo"  # as `xmodal demo` writes it: the run in demo/run, a report beside it
    shutil.copytree(pristine, demo / "run")
    (demo / "report.html").write_text("<html></html>")
    (demo / "metrics.json").write_text("{}")
    (demo / "plots").mkdir()
    with pytest.raises(XmodalError, match=rf"demo: not a run folder; the run is {demo / 'run'} \(pass that folder\)"):
        load(demo)
    assert main(["eval", str(demo)]) == 2
    err = capsys.readouterr().err
    assert f"the run is {demo / 'run'}" in err and len(err.strip().splitlines()) == 1


def test_folder_holding_several_runs_lists_them(pristine, tmp_path):
    shutil.copytree(pristine, tmp_path / "runs" / "a")
    shutil.copytree(pristine, tmp_path / "runs" / "b")
    with pytest.raises(XmodalError, match=r"runs: not a run folder; it holds several: .*runs/a, .*runs/b"):
        load(tmp_path / "runs")


def test_folder_without_runs_says_what_a_run_folder_holds(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(XmodalError, match=r"empty: not an xmodal run folder \(no best/ or checkpoints/latest\.json\)"):
        load(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(XmodalError, match=r"file\.txt: not a folder"):
        load(tmp_path / "file.txt")


def test_run_without_best_yet_suggests_latest(run):
    shutil.rmtree(run / "best")
    with pytest.raises(XmodalError, match=r"run: no best checkpoint yet .*checkpoint latest"):
        load(run)
    assert load(run, checkpoint="latest").step == STEP


# ------------------------------------------------------------------------------------------
# 3. config ranges
@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size: expected an integer >= 1, got 0"),
    ("train.steps=0", "train.steps: expected an integer >= 1, got 0"),
    ("train.steps=-5", "train.steps: expected an integer >= 1, got -5"),
    ("train.steps=1.0e+30", "train.steps: expected an integer < 2**63, got 1000000000000000019884624838656"),
    ("train.batch_size=12345678901234567890",
     "train.batch_size: expected an integer < 2**63, got 12345678901234567890"),
    ("optim.lr=.nan", "optim.lr: expected a finite number > 0, got nan"),
    ("optim.lr=.inf", "optim.lr: expected a finite number > 0, got inf"),
    ("optim.lr=0", "optim.lr: expected a finite number > 0, got 0.0"),
    ("optim.lr=-1e-3", "optim.lr: expected a finite number > 0, got -0.001"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: expected a finite number >= 0, got -0.1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: expected an integer >= 0, got -1"),
    ("optim.step_size=0", "optim.step_size: expected an integer >= 1, got 0"),
    ("optim.gamma=0", "optim.gamma: expected a finite number > 0, got 0.0"),
    ("optim.grad_clip=-1", "optim.grad_clip: expected a finite number >= 0, got -1.0"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 numbers in [0, 1), got [0.9]"),
    ("optim.betas=[0.9, 1.0]", "optim.betas: expected a list of 2 numbers in [0, 1), got [0.9, 1.0]"),
    ("train.eval_every=-1", "train.eval_every: expected an integer >= 0, got -1"),
    ("train.log_every=-1", "train.log_every: expected an integer >= 0, got -1"),
    ("train.early_stop=-2", "train.early_stop: expected an integer >= 0, got -2"),
    ("train.keep_checkpoints=-1", "train.keep_checkpoints: expected an integer >= 0, got -1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every: expected an integer >= 0, got -1"),
    ("train.extract_batch_size=0", "train.extract_batch_size: expected an integer >= 1, got 0"),
    ("train.seed=-1", "train.seed: expected an integer >= 0, got -1"),
    ("eval.block_size=0", "eval.block_size: expected an integer >= 1, got 0"),
    ("eval.rerank_k=-1", "eval.rerank_k: expected an integer >= 0, got -1"),
    ("eval.rerank_fusion=.nan", "eval.rerank_fusion: expected a finite number >= 0, got nan"),
    ("model.embed_dim=0", "model.embed_dim: expected an integer >= 1, got 0"),
    ("model.image_head.hidden_dim=0", "model.image_head.hidden_dim: expected an integer >= 1, got 0"),
    ("model.text_head.dropout=1", "model.text_head.dropout: expected a number in [0, 1), got 1.0"),
])
def test_out_of_range_config_values_name_the_key_and_value(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_range_errors_from_a_file_and_includes(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: -5}\n")
    (tmp_path / "exp.yaml").write_text("include: base.yaml\noptim: {lr: 1e-3}\n")
    with pytest.raises(ConfigError, match=r"^train\.steps: expected an integer >= 1, got -5$"):
        load_config(tmp_path / "exp.yaml")
    assert load_config(tmp_path / "exp.yaml", ["train.steps=5"]).train.steps == 5
    (tmp_path / "inc.yaml").write_text("include: 5\n")
    with pytest.raises(ConfigError, match=r"inc\.yaml: include: expected a file name or a list of file names, got 5"):
        load_config(tmp_path / "inc.yaml")
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")


def test_packaged_configs_are_in_range():
    from xmodal.demo import packaged_config

    root = Path(packaged_config("base.yaml")).parent
    for path in sorted(root.rglob("*.yaml")):
        load_config(path)  # raises on any value out of range


def test_cli_train_refuses_bad_values_before_any_work(tmp_path, capsys):
    data = write_synthetic_precomp(tmp_path / "data", sizes=(("train", 8), ("dev", 4), ("test", 4)))
    cfg = write_tiny_config(tmp_path / "c.yaml", data)
    for bad, key in (("train.batch_size=0", "train.batch_size"), ("train.steps=-5", "train.steps"),
                     ("optim.lr=.nan", "optim.lr")):
        assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress", bad]) == 2
        err = capsys.readouterr().err
        assert f"error: {key}: expected" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "run").exists()
