"""The body of a build stage's process: ``python -m MODULE ARGS...`` without a new
interpreter (``convert.build_default_model.run_forked`` starts it in a forked process)."""

import runpy
import sys


def run_module_as_main(argv) -> None:
    """Runs module ``argv[0]`` as ``__main__`` with ``sys.argv`` set to ``argv`` (its exit
    status is the process's, as multiprocessing ends a process that raised ``SystemExit``)."""
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
