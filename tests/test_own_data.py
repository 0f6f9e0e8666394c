"""Your own data, as the README shows it: a CSV table of real image files, trained and evaluated
with the README's commands; and the checks that make a wrong table fail before any extraction."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from image_fixtures import write_ok
from xmodal.cli import main

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "src" / "xmodal" / "configs" / "emoji" / "baseline.yaml"
WORDS = ["red", "blue", "green", "black", "white", "pink", "gray", "gold", "teal", "navy",
         "lime", "plum", "rust", "sand", "snow", "jade", "ruby", "mint", "rose", "onyx"]
README_ARGS = ["data.format=table", "data.path=my_table.csv"]
FAST = ["train.steps=3", "train.eval_every=3", "train.tensorboard=false", "--no-progress"]


def write_table(folder: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> Path:
    """``folder/my_table.csv``: 20 real JPEG files under ``images/``, 2 captions each (40 rows);
    12 images train, 4 val, 4 test (or, with fewer splits, the rest of them train)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, word in enumerate(WORDS):
        write_ok(folder / "images" / f"{k:04d}.jpg", seed=k, size=(48, 40))
        split = "train" if k < 12 else ("val" if k < 16 else "test")
        split = split if split in splits else "train"
        rows += [{"image": f"images/{k:04d}.jpg", "caption": f"A {word} picture.", "split": split},
                 {"image": f"images/{k:04d}.jpg", "caption": f"Some {word} noise.", "split": split}]
    path = folder / "my_table.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "caption", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is built: the checks must answer before any model or extraction."""
    import xmodal.data.pipeline as pipeline
    import xmodal.models as models

    def refuse(*a, **k):
        raise AssertionError("a model was built / features extracted before the data checks answered")

    monkeypatch.setattr(models, "create_model", refuse)
    monkeypatch.setattr(pipeline, "image_inputs", refuse)


def test_readme_own_data_command_trains_and_evaluates_a_40_row_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_table(tmp_path)
    # xmodal train configs/emoji/baseline.yaml --out runs/mine data.format=table data.path=my_table.csv
    assert main(["train", str(BASELINE), "--out", "runs/mine", *README_ARGS, *FAST]) == 0
    err = capsys.readouterr().err
    # 24 training captions, train.batch_size 128: lowered, with one note
    notes = [line for line in err.splitlines() if line.startswith("note: train.batch_size=128")]
    assert len(notes) == 1 and "train.batch_size=24" in notes[0], err
    saved = yaml.safe_load((tmp_path / "runs/mine/config.yaml").read_text())
    assert saved["train"]["batch_size"] == 24 and saved["data"]["path"] == "my_table.csv"
    assert (tmp_path / "runs/mine/best/model.safetensors").exists()
    # xmodal eval runs/mine --split test
    assert main(["eval", "runs/mine", "--split", "test", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["t2i_r1"] <= 100 and metrics["rsum"] > 0
    # the same command with --resume finds the same config (the batch size is lowered the same way)
    assert main(["train", str(BASELINE), "--out", "runs/mine", *README_ARGS, *FAST, "--resume"]) == 0
    assert "differ" not in capsys.readouterr().err


def test_batch_size_is_lowered_to_the_training_set(tmp_path):
    from xmodal.config import load_config
    from xmodal.train.loop import check_data

    table = write_table(tmp_path)
    cfg = load_config(BASELINE, ["data.format=table", f"data.path={table}"])
    train_ds, val_ds, note = check_data(cfg)
    assert (train_ds.num_texts, val_ds.num_texts) == (24, 8)
    assert cfg.train.batch_size == 24 and "train.batch_size=128" in note and "24 texts" in note
    cfg = load_config(BASELINE, ["data.format=table", f"data.path={table}", "train.batch_size=16"])
    assert check_data(cfg)[2] is None and cfg.train.batch_size == 16  # small enough: kept, no note
    cfg = load_config(BASELINE, ["data.format=table", f"data.path={table}"])
    assert check_data(cfg, world_size=5)[2] is not None and cfg.train.batch_size == 20  # a multiple of 5


@pytest.mark.parametrize("case, message", [
    ("missing_table", "no such file"),
    ("no_val_rows", "data.val_split"),
    ("missing_column", "missing column(s) caption"),
    ("no_image_files", "none of its 12 image files exists"),
    ("bad_optimizer", "optim.name"),
])
def test_bad_own_data_fails_before_any_model_or_extraction(case, message, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    table = write_table(tmp_path, splits=("train", "test") if case == "no_val_rows" else ("train", "val", "test"))
    args = list(README_ARGS)
    if case == "missing_table":
        args[1] = "data.path=nope.csv"
    elif case == "missing_column":
        table.write_text(table.read_text().replace("caption", "text", 1))
    elif case == "no_image_files":
        (tmp_path / "moved").mkdir()
        table.rename(tmp_path / "moved" / table.name)
        args[1] = "data.path=moved/my_table.csv"
    elif case == "bad_optimizer":
        args.append("optim.name=rmsprop")
    assert main(["train", str(BASELINE), "--out", "runs/mine", *args, *FAST]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing left behind, not even the parent folder


def test_failed_checks_leave_an_existing_out_folder_as_it_was(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "mine"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    assert main(["train", str(BASELINE), "--out", str(out), "data.format=table", "data.path=nope.csv", *FAST]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine\n"


def test_packaged_emoji_name_reads_the_embedded_data(tmp_path, monkeypatch):
    """``load_dataset("emoji", "emoji", split)`` (and so ``xmodal extract --format emoji --path emoji``)
    means the packaged dataset, from any working directory."""
    from xmodal.data import load_dataset
    from xmodal.errors import DataError

    monkeypatch.chdir(tmp_path)
    ds = load_dataset("emoji", "emoji", "test")
    assert ds.num_images == 500 and ds.num_texts == 250
    with pytest.raises(DataError, match="no such file"):
        load_dataset("table", "emoji", "test")  # only the emoji reader knows the name
