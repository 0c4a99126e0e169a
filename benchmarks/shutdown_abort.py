"""Minimal reproduction: a native abort at interpreter exit with MLX threads.

    python benchmarks/shutdown_abort.py            # runs the two cases below 20 times each

A Python thread runs one ``mx.compile``'d function, is joined, and the
interpreter exits. Now and then the process aborts with "terminate called
without an active exception" (status 134):

* MLX keeps a ``thread_local`` compile cache per thread; the cached entries
  hold Python objects, so its destructor re-enters Python
  (``PyGILState_Ensure``) when the OS thread ends (gdb:
  ``__call_tls_dtors`` -> ``~shared_ptr<CompileCache>`` -> ``PyGILState_Ensure``
  -> ``take_gil`` -> ``PyThread_exit_thread`` -> ``pthread_exit`` ->
  forced unwind -> ``std::terminate``);
* ``Thread.join`` returns before the OS thread has run its ``thread_local``
  destructors, so they can run while the main thread finalizes the
  interpreter, and CPython 3.11 then ends the thread with ``pthread_exit``
  from inside a ``noexcept`` destructor.

The workaround (``--clear``): the thread calls ``mx.clear_streams()`` before it
ends, which empties its compile cache while it still holds the GIL. The
server does this on its one generation thread (``mlx_specstream.server``).
Found with mlx 0.32.4 (CPU) and CPython 3.11.7 on Linux.
"""

import argparse
import subprocess
import sys
import threading

import mlx.core as mx


@mx.compile
def double(x):
    return x * 2


def child(clear: bool):
    def work():
        mx.eval(double(mx.ones(4)))  # fills this thread's compile cache
        if clear:
            mx.clear_streams()

    t = threading.Thread(target=work)
    t.start()
    t.join()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=["plain", "clear"], help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    if args.child:
        return child(args.child == "clear")
    print(f"mlx {mx.__version__}, Python {sys.version.split()[0]}, {args.runs} runs each")
    for case in ("plain", "clear"):
        codes = [
            subprocess.run(
                [sys.executable, __file__, "--child", case], capture_output=True, text=True
            )
            for _ in range(args.runs)
        ]
        aborts = sum(c.returncode != 0 for c in codes)
        said = sum("terminate called without an active exception" in c.stderr for c in codes)
        print(f"{case:5s}: {aborts}/{args.runs} aborted ({said} said 'terminate called ...')")


if __name__ == "__main__":
    main()
