"""The ``xmodal`` command line: thin, it parses arguments and calls the library.

Each sub-command lives in its own module under :mod:`xmodal.cli` and registers itself
with :func:`command`; user errors (:class:`xmodal.errors.XmodalError`) print one line and
exit with status 2, never a traceback.

Start-up stays fast: a command module imports only argparse-level things at its top and the
library inside its ``run()``, and :func:`main` adds the arguments of the one command it runs
(``xmodal --help`` lists the commands without building their parsers). ``tests/test_cli_fast.py``
checks that ``--help`` and argument or config errors never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import Callable

from ..errors import XmodalError

_COMMAND_MODULES = (
    "demo", "evaluate_embeddings", "train", "evaluate", "extract",
    "index", "search", "retrieve_corpus", "serve", "train_synthesis", "synthesize", "inspect", "export",
    "pretrained",
)


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


_COMMANDS: dict[str, Command] = {}


def command(name: str, help: str):
    """Register ``run(args)``; the decorated function gets ``.arguments`` attached by :func:`arguments`."""

    def deco(fn):
        add = getattr(fn, "_add_arguments", lambda p: None)
        _COMMANDS[name] = Command(name, help, add, fn)
        return fn

    return deco


def arguments(add: Callable[[argparse.ArgumentParser], None]):
    def deco(fn):
        fn._add_arguments = add
        return fn

    return deco


def _load_commands() -> None:
    for mod in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def build_parser(only: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``xmodal`` parser; ``only``: the commands whose arguments are added (None: all of them;
    the others still parse, with no arguments of their own)."""
    _load_commands()
    parser = argparse.ArgumentParser(prog="xmodal", description="Cross-modal image-text retrieval.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in _COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if only is None or cmd.name in only:
            cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def _command_named(argv: list[str]) -> str | None:
    """The command ``argv`` runs (the first word that is not an option), or None."""
    for word in argv:
        if word in ("-h", "--help", "--"):
            return None
        if not word.startswith("-"):
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _command_named(argv)
    parser = build_parser(only=[name] if name else [])
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may come after options (``--out RUN optim.lr=1e-3``)
    if hasattr(args, "overrides"):
        late = [e for e in extra if "=" in e and not e.startswith("-")]
        args.overrides = list(args.overrides or []) + late
        extra = [e for e in extra if e not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = args._run(args)
    except XmodalError as exc:
        print(f"xmodal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xmodal {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
