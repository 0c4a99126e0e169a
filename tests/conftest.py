"""Ends the test process with pytest's own exit status (set
``SPECSTREAM_NATURAL_EXIT=1`` to let the interpreter finalize normally).

Why: after a full run (334 passed), the interpreter's shutdown could abort in
native code ("terminate called without an active exception", status 134).
The cause, found with gdb: MLX keeps a ``thread_local`` compile cache per
thread that ran ``mx.compile``'d functions (mlx-lm's samplers and activations
are), and its destructor re-enters Python (``PyGILState_Ensure``) when the OS
thread ends. If a thread ends while the interpreter finalizes, CPython 3.11
stops it with ``pthread_exit`` inside that destructor, and the forced unwind
through a ``noexcept`` frame calls ``std::terminate``. ``Thread.join`` returns
before the OS thread runs those destructors, so even joined threads race with
the exit. ``benchmarks/shutdown_abort.py`` reproduces it with MLX alone.

In this suite the threads were the server's: each HTTP handler thread ran the
model, and the handler of a keep-alive connection ended only when the openai
client was collected, during finalization. The server now runs all MLX work
on one generation thread that empties its compile cache (``mx.clear_streams``)
and ends before finalization, handler threads never touch MLX, and the test
fixtures close their clients (``test_server.py`` checks a serving process
exits with status 0). The ``os._exit`` below stays as a guard, since any
thread that runs MLX and ends at exit can still trigger it; leaving with
``os._exit`` once pytest is done skips those destructors and says nothing
about the results, which are all reported by then.
"""

import os
import sys
import tempfile

# On a GPU, MLX runs float32 matmuls in TF32 unless this is 0 (read before MLX's
# first matmul): the equality tests need full float32. No effect on the CPU.
os.environ["MLX_ENABLE_TF32"] = "0"

# pytest-xdist runs one worker per core. PyTorch's OpenMP threads (one per core)
# spin-wait on each other, so beside another busy worker a torch test ran 5-8x
# slower (test_finetune.py: 38 s alone, 186 s beside test_sampling.py, 54 s with
# one thread). Each worker, and the processes it starts, takes one thread.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# `tune --save` keeps the choices for models whose files it does not write in the user's
# store: the tests' (and the commands they start) go to a file of their own, never ~/.cache.
os.environ["MLX_SPECSTREAM_TUNED"] = os.path.join(tempfile.mkdtemp(), "tuned.json")

import pytest

_status = {}


@pytest.fixture
def fresh_layouts():
    """Tree layouts are cached per topology: build them anew under a patch, and after it."""
    import mlx_specstream.layout as layout_module

    layout_module._layout.cache_clear()
    yield
    layout_module._layout.cache_clear()


def pytest_sessionfinish(session, exitstatus):
    _status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    if "code" in _status and os.environ.get("SPECSTREAM_NATURAL_EXIT") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_status["code"])
