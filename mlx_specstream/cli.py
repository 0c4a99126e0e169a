"""``python -m mlx_specstream COMMAND ...`` and the ``mlx_specstream.COMMAND``
console scripts, as mlx-lm's (``python -m mlx_lm generate``, ``mlx_lm.generate``)."""

import importlib
import sys
from typing import List, Optional

COMMANDS = ("benchmark", "chat", "draft_vocab", "generate", "quantize", "server", "train", "tune")


def main(argv: Optional[List[str]] = None):
    """Runs ``COMMAND``'s ``main`` with the remaining arguments.

    Example: ``python -m mlx_specstream generate --prompt "def f(x):"`` runs
    ``mlx_specstream.generate.main(["--prompt", "def f(x):"])``.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m mlx_specstream {{{','.join(COMMANDS)}}} ...")
        print("For help on a command, pass --help to it, e.g. mlx_specstream.generate --help")
        return
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise SystemExit(f"mlx_specstream: unknown command {command!r}; choose one of {COMMANDS}")
    sys.argv = [f"mlx_specstream.{command}", *rest]  # (what the command's parser shows)
    importlib.import_module(f"mlx_specstream.{command}").main(rest)
