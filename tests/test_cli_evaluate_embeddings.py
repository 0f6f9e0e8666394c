"""``xmodal evaluate-embeddings``: output formats and one-line errors."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

import xmodal
from xmodal.cli import main
from xmodal.eval.metrics import METRIC_KEYS


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((30, 8)).astype(np.float32)
    mapping = np.repeat(np.arange(30), 2)
    txt = (img[mapping] + 0.7 * rng.standard_normal((60, 8))).astype(np.float32)
    paths = {
        "img": tmp_path / "images.npy", "txt": tmp_path / "texts.npy",
        "map": tmp_path / "map.npy", "json": tmp_path / "map.json",
    }
    np.save(paths["img"], img)
    np.save(paths["txt"], txt)
    np.save(paths["map"], mapping)
    paths["json"].write_text(json.dumps([[int(i)] for i in mapping]))
    return paths, img, txt, mapping


def run(argv, capsys):
    rc = main(["evaluate-embeddings", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_table_output(files, capsys):
    """The table is ``xmodal eval``'s: print_metrics of the same numbers, line for line."""
    from rich.console import Console

    from xmodal.eval.report import print_metrics

    p, *_ = files
    rc, out, err = run([p["img"], p["txt"], "--text-to-image", p["map"]], capsys)
    assert rc == 0, err
    assert "R@1" in out and "i2t (image \u2192 text)" in out and "t2i (text \u2192 image)" in out and "rsum" in out
    rc, js, _ = run([p["img"], p["txt"], "--text-to-image", p["map"], "--json"], capsys)
    console = Console(file=io.StringIO(), width=80, color_system=None)
    print_metrics(json.loads(js), console=console, title="full: 30 images x 60 texts")
    assert out == console.file.getvalue()


def test_parser_and_module_import_nothing_heavy():
    """``xmodal --help`` builds every parser: eval's and this one's must not pull in torch & co."""
    code = (
        "import argparse, sys\n"
        "from xmodal.cli import evaluate, evaluate_embeddings\n"
        "evaluate._args(argparse.ArgumentParser()); evaluate_embeddings._args(argparse.ArgumentParser())\n"
        "heavy = ('torch', 'numpy', 'matplotlib', 'PIL', 'xmodal.eval.metrics', 'xmodal.eval.report')\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    from xmodal.cli.evaluate_embeddings import DEFAULT_BLOCK_SIZE
    from xmodal.eval.metrics import DEFAULT_BLOCK_SIZE as ENGINE_DEFAULT

    assert DEFAULT_BLOCK_SIZE == ENGINE_DEFAULT


def test_json_keys_and_values(files, capsys):
    p, img, txt, mapping = files
    rc, out, err = run([p["img"], p["txt"], "--text-to-image", p["json"], "--json", "--block-size", "7"], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert list(result) == list(METRIC_KEYS)
    assert result == pytest.approx(xmodal.evaluate_embeddings(img, txt, mapping))
    rc, out, _ = run([p["img"], p["txt"], "-m", p["map"], "--json", "--dtype", "bf16", "--device", "cpu"], capsys)
    assert rc == 0 and set(json.loads(out)) == set(METRIC_KEYS)


def _save(path, arr):
    np.save(path, arr)
    return path


@pytest.mark.parametrize("case,needle", [
    ("dim", "8-d"),
    ("nan", "row 3 contains NaN"),
    ("empty", "empty"),
    ("range", "outside 0..29"),
    ("length", "59 entries but there are 60 texts"),
    ("int_emb", "floating-point"),
    ("ndim", "2-D"),
    ("float_map", "integers"),
    ("missing", "missing.npy"),
    ("garbage", "garbage.npy"),
    ("bad_json", "map.json:1"),
    ("map_ext", ".npy or .json"),
    ("protocol", "choose one of"),
    ("too_small", "coco5k"),
    ("block", "block_size"),
])
def test_errors_are_one_line_exit_2(files, tmp_path, capsys, case, needle):
    p, img, txt, mapping = files
    args = [p["img"], p["txt"], "--text-to-image", p["map"]]
    if case == "dim":
        args[1] = _save(tmp_path / "t4.npy", txt[:, :4])
    elif case == "nan":
        bad = img.copy()
        bad[3, 1] = np.nan
        args[0] = _save(tmp_path / "nan.npy", bad)
    elif case == "empty":
        args[0] = _save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32))
    elif case == "range":
        args[3] = _save(tmp_path / "m.npy", np.where(mapping == 5, 30, mapping))
    elif case == "length":
        args[3] = _save(tmp_path / "m.npy", mapping[:59])
    elif case == "int_emb":
        args[0] = _save(tmp_path / "i.npy", np.ones((30, 8), np.int32))
    elif case == "ndim":
        args[0] = _save(tmp_path / "i.npy", np.ones((30, 8, 2), np.float32))
    elif case == "float_map":
        args[3] = _save(tmp_path / "m.npy", mapping.astype(np.float32))
    elif case == "missing":
        args[1] = tmp_path / "missing.npy"
    elif case == "garbage":
        (tmp_path / "garbage.npy").write_bytes(b"not a numpy file at all")
        args[0] = tmp_path / "garbage.npy"
    elif case == "bad_json":
        (tmp_path / "map.json").write_text("[[0], [1,]")
        args[3] = tmp_path / "map.json"
    elif case == "map_ext":
        args[3] = tmp_path / "map.txt"
    elif case == "protocol":
        args += ["--protocol", "coco2k"]
    elif case == "too_small":
        args += ["--protocol", "coco5k"]
    elif case == "block":
        args += ["--block-size", "0"]
    rc, out, err = run(args, capsys)
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert needle in err


def test_subprocess_error_has_no_traceback(files, tmp_path):
    p, *_ = files
    proc = subprocess.run([sys.executable, "-m", "xmodal", "evaluate-embeddings", str(p["img"]),
                           str(tmp_path / "nope.npy"), "--text-to-image", str(p["map"]), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nope.npy" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stdout == ""
