"""The command line answers --help and argument / config errors without importing torch & co.

Each case runs in a fresh interpreter (``sys.modules`` of this test process already holds
torch) and prints how long the call took, imports included.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "src" / "xmodal" / "configs" / "emoji" / "baseline.yaml"
HEAVY = ("torch", "transformers", "matplotlib", "numpy", "PIL", "safetensors", "xmodal.eval.metrics",
         "xmodal.models", "xmodal.train.loop", "xmodal.data.features")
COMMANDS = ("demo", "evaluate-embeddings", "train", "eval", "extract", "index", "search", "retrieve-corpus",
            "serve", "train-synthesis", "synthesize")

_PROBE = """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from xmodal.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        rc = main(ARGV)
    except SystemExit as exc:
        rc = exc.code
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "out": out.getvalue(), "err": err.getvalue(),
                  "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def _probe(argv: list[str], cwd: Path = ROOT) -> dict:
    code = _PROBE.replace("ARGV", repr(argv)).replace("HEAVY", repr(HEAVY))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"xmodal {' '.join(argv)}: rc {res['rc']} in {res['seconds'] * 1000:.0f} ms (imports included)")
    return res


def test_help_imports_nothing_heavy():
    res = _probe(["--help"])
    assert res["rc"] == 0 and "COMMAND" in res["out"]
    assert all(name in res["out"] for name in COMMANDS)
    assert res["heavy"] == []


@pytest.mark.parametrize("name", COMMANDS)
def test_command_help_imports_nothing_heavy(name):
    res = _probe([name, "--help"])
    assert res["rc"] == 0 and f"usage: xmodal {name}" in res["out"]
    assert res["heavy"] == []


def test_unknown_config_key_imports_nothing_heavy(tmp_path):
    out = tmp_path / "x"
    res = _probe(["train", str(BASELINE), "--out", str(out), "trian.steps=3"])
    assert res["rc"] == 2
    assert "unknown config key 'trian'" in res["err"] and "Traceback" not in res["err"]
    assert res["heavy"] == []
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["train"],                                                   # argparse: missing arguments
    ["train", "no/such/config.yaml", "--out", "OUT"],            # missing config file
    ["train", str(BASELINE), "--out", "OUT", "train.steps=0"],   # a value out of range
    ["train", str(BASELINE), "--out", "OUT", "optim.lr"],        # not KEY=VALUE
    ["demo", "trian.steps=3"],                                   # the demo's overrides
    ["extract", "--format", "table", "--path", "x.csv", "--split", "test", "--out", "OUT", "--tower-arg", "bad"],
    ["index", "no/such/run", "--data", "split:test", "--out", "OUT"],
    ["retrieve-corpus", "no/such/index", "no/such/corpus.txt", "--out", "OUT"],
    ["train-synthesis", "no/such/run", "--out", "OUT"],
    ["synthesize", "no/such/syn", "a red apple", "--out", "OUT"],
    ["bogus"],
])
def test_argument_and_config_errors_import_nothing_heavy(argv, tmp_path):
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in argv]
    res = _probe(argv, cwd=tmp_path)
    assert res["rc"] == 2, res
    assert "error" in res["err"] and "Traceback" not in res["err"]
    assert res["heavy"] == [], res["err"]
    assert not (tmp_path / "out").exists()


def test_cli_modules_import_only_argparse_level_things():
    """Every module under xmodal.cli, imported (and its parser built), pulls in nothing heavy;
    nor does reading a config (the path every command's errors go through first)."""
    code = (
        "import argparse, pkgutil, importlib, json, sys\n"
        "import xmodal.cli as cli\n"
        "names = [m.name for m in pkgutil.iter_modules(cli.__path__) if m.name != '__main__']\n"
        "for n in names:\n"
        "    importlib.import_module('xmodal.cli.' + n)\n"
        "cli.build_parser()\n"
        "from xmodal.config import load_config, to_dict, save\n"
        f"cfg = load_config({str(BASELINE)!r}, ['train.steps=3', 'data.format=table'])\n"
        f"print(json.dumps({{'n': len(names), 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["n"] >= len(COMMANDS) and res["heavy"] == []


def test_full_parser_still_has_every_commands_arguments():
    from xmodal.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "c.yaml", "--out", "r", "--resume"])
    assert args.out == "r" and args.resume
    args = parser.parse_args(["-v", "extract", "--format", "emoji", "--path", "emoji", "--split", "test",
                              "--out", "f"])
    assert args.verbose and args.format == "emoji"
