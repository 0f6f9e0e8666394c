"""Trainer: smoke run, CLI train/eval, checkpoints, and exact resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from train_fixtures import write_synthetic_precomp, write_tiny_config
from xmodal.cli import main
from xmodal.config import load_config
from xmodal.errors import XmodalError
from xmodal.train.loop import lr_at, train

KEYS = "i2t_r1 i2t_r5 i2t_r10 i2t_medr i2t_meanr t2i_r1 t2i_r5 t2i_r10 t2i_medr t2i_meanr rsum".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_precomp(tmp_path_factory.mktemp("precomp"))


def test_train_then_eval_cli(data, tmp_path, capsys):
    cfg = write_tiny_config(tmp_path / "tiny.yaml", data, steps=120)
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert (run / "config.yaml").exists() and (run / "best" / "model.safetensors").exists()
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in log} == {"train", "val"}
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert list(metrics) == KEYS
    # 40 test images, 80 captions: chance t2i R@10 is 25%; the model must learn colors x shapes
    assert metrics["t2i_r10"] > 60 and metrics["rsum"] > 250
    # the saved config rebuilds the model (tokenizer embedded), the run cannot be overwritten by accident
    assert "tokenizer_json" in (run / "config.yaml").read_text()
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 2
    # a report folder
    assert main(["eval", str(run), "--report", str(tmp_path / "rep"), "--json"]) == 0
    assert (tmp_path / "rep" / "report.html").exists() and (tmp_path / "rep" / "metrics.json").exists()


def test_lr_schedules():
    cfg = load_config(None, ["optim.lr=1.0", "optim.warmup_steps=10", "optim.schedule=cosine"]).optim
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.5)
    assert lr_at(110, cfg, 110) == pytest.approx(0.0)
    step = load_config(None, ["optim.lr=1.0", "optim.schedule=step", "optim.step_size=5", "optim.gamma=0.5"]).optim
    assert [lr_at(s, step, 100) for s in (0, 4, 5, 12)] == [1.0, 1.0, 0.5, 0.25]


def test_bad_config_values(data, tmp_path):
    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", data), ["optim.name=rmsprop"])
    with pytest.raises(XmodalError, match="optim.name"):
        train(cfg, tmp_path / "r1", progress=False)
    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", data), ["model.image.name=nope"])
    with pytest.raises(XmodalError, match="unknown image tower 'nope'"):
        train(cfg, tmp_path / "r2", progress=False)
    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", data), ["data.path=/no/such/folder"])
    with pytest.raises(XmodalError, match="no such file"):
        train(cfg, tmp_path / "r3", progress=False)


def test_cli_errors_have_no_traceback(data, tmp_path):
    cfg = write_tiny_config(tmp_path / "c.yaml", data)
    for args in (["train", str(cfg), "--out", str(tmp_path / "r"), "optim.lrr=1"],
                 ["train", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")],
                 ["eval", str(tmp_path / "not_a_run")]):
        proc = subprocess.run([sys.executable, "-m", "xmodal", *args], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr


def _final(run: Path) -> tuple[dict, dict]:
    state = json.loads((run / "best" / "state.json").read_text())
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    weights = load_file(str(run / "checkpoints" / latest["dir"] / "model.safetensors"))
    return state, weights


def test_resume_after_sigkill_is_exact(data, tmp_path):
    steps = 1000
    cfg = write_tiny_config(tmp_path / "c.yaml", data, steps=steps)
    overrides = ["train.eval_every=250", "train.checkpoint_every=10"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref"
    train(load_config(cfg, overrides), ref, progress=False)

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "xmodal", "train", str(cfg), "--out", str(run),
                             "--no-progress", *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = run / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists():
            try:
                step = json.loads(pointer.read_text())["step"]
            except (ValueError, KeyError):
                step = 0
            if step >= 100:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.01)
    proc.wait()
    assert killed_at is not None and killed_at < steps, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL

    assert main(["train", str(cfg), "--out", str(run), "--resume", "--no-progress", *overrides]) == 0
    (s_ref, w_ref), (s_run, w_run) = _final(ref), _final(run)
    assert s_run == s_ref  # same best step and exactly the same metrics
    assert w_ref.keys() == w_run.keys()
    for k in w_ref:
        np.testing.assert_array_equal(w_ref[k], w_run[k])
    # a resume with a different config is refused
    assert main(["train", str(cfg), "--out", str(run), "--resume", "--no-progress", "optim.lr=0.1"]) == 2


def test_early_stopping(data, tmp_path):
    # lr = 1e-20 (0 is refused): updates below float32 resolution leave the model as it is, so validation
    # rsum never improves after the first evaluation and the second one stops the run
    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", data, steps=100),
                      ["optim.lr=1e-20", "train.eval_every=10", "train.early_stop=1"])
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["stopped_early"] and summary["steps"] == 20 and summary["best_step"] == 10


def test_identity_heads_with_trainable_towers(data, tmp_path):
    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", data, steps=5),
                      ["model.text_head.proj=identity", "model.image_head.proj=identity", "train.eval_every=5"])
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 5 and summary["best_val"]["rsum"] > 0


def test_fp16_loss_scale_survives_a_checkpoint(tmp_path):
    """An fp16 run's GradScaler state goes through the checkpoint's JSON and comes back."""
    import torch

    from xmodal.train.loop import restore_grad_scaler

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    before = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    for grad in (float("inf"), 1.0, 1.0):  # one overflow (scale halves), two good steps
        opt.zero_grad()
        (before.scale(w.sum()) * grad).backward()
        before.step(opt)
        before.update()
    saved = json.loads(json.dumps(before.state_dict()))  # what state.json holds
    assert saved["scale"] == 512.0 and saved["_growth_tracker"] == 2
    after = torch.amp.GradScaler("cpu")
    restore_grad_scaler(after, saved, tmp_path)
    assert after.get_scale() == 512.0 and after.state_dict() == before.state_dict()
    restore_grad_scaler(None, saved, tmp_path)  # not an fp16 run: nothing to do
    with pytest.raises(XmodalError, match="grad_scaler"):
        restore_grad_scaler(torch.amp.GradScaler("cpu"), {"scale": 2.0}, tmp_path)


def test_resume_config_check_names_changes_and_ignores_new_defaults(data, tmp_path):
    """A checkpoint's config saved before a schema field existed still resumes (the field takes
    its default); a real change is named by its dotted key."""
    import yaml

    from xmodal import config as C
    from xmodal.train.loop import config_changes

    cfg = load_config(write_tiny_config(tmp_path / "c.yaml", data, steps=5))
    old = C.to_dict(cfg)
    del old["data"]["train_holdout"]  # as a run saved before data.train_holdout existed
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(old))
    assert config_changes(saved, cfg) == []
    changed = load_config(write_tiny_config(tmp_path / "c.yaml", data, steps=5), ["optim.lr=0.1", "train.seed=3"])
    assert config_changes(saved, changed) == ["optim.lr", "train.seed"]
