"""How many kernels a lazy MLX graph will launch, counted before it runs.

On a GPU a small model's decoding step is bound by launches, not arithmetic:
each primitive that writes memory is one kernel (a few microseconds on MLX's
CUDA backend) and one node the host builds and encodes. These counts are exact
and the same on every machine, so a step's launch overhead can be measured on
a CPU: :func:`count_kernels` reads the graph MLX would evaluate
(``mx.export_to_dot``) and :class:`FastOps` corrects for the fused ops (RMS
norm, RoPE, attention) that MLX's CPU backend builds as several primitives but
a GPU runs as one kernel.

Example:
    >>> import mlx.core as mx
    >>> x = mx.ones((4,))
    >>> mx.eval(x)
    >>> count_kernels([(x * 2 + 1).reshape(2, 2)])  # the reshape is a view
    Counter({'Multiply': 1, 'Add': 1})
"""

import os
import re
import tempfile
from collections import Counter
from contextlib import contextmanager
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

# Primitives that only re-describe their input's memory (no kernel on a GPU);
# Broadcast also covers the scalars MLX broadcasts into elementwise ops.
VIEWS = frozenset(
    {"AsStrided", "Broadcast", "ExpandDims", "Flatten", "Reshape", "Slice", "Squeeze",
     "StopGradient", "Transpose", "Unflatten"}
)  # fmt: skip

_LABEL = re.compile(r'label ="([A-Za-z0-9_]+)"')


def count_nodes(arrays: List[mx.array]) -> Counter:
    """Every primitive, views included, that evaluating ``arrays`` would run, by name."""
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *arrays)
        with open(path) as f:
            return Counter(_LABEL.findall(f.read()))
    finally:
        os.remove(path)


def count_kernels(arrays: List[mx.array]) -> Counter:
    """The primitives that evaluating ``arrays`` would run that are not views, by name."""
    return _kernels(count_nodes(arrays))


def _kernels(nodes: Counter) -> Counter:
    return Counter({k: v for k, v in nodes.items() if k not in VIEWS})


class FastOps:
    """Records the fused ops (``mx.fast``) called while it is active, and how
    many kernels each one's CPU graph has beyond the one a GPU launches.

    On MLX's CPU backend ``mx.fast.rms_norm`` is built from a square, a mean,
    an rsqrt and two products: five kernels where a GPU launches one. RMS norm,
    layer norm and RoPE are one kernel on MLX's GPU backends. Attention is one
    kernel on MLX's CUDA backend in float16 and bfloat16 with head dimensions
    that are multiples of 8 up to 128 (cuDNN's, on Ampere and later), and for
    a single query row without an array mask (its vector kernel); otherwise
    (float32 over several rows) it runs the matmul-softmax-matmul graph there.
    A bool mask given to its one kernel costs one more there: CUDA takes
    additive masks only, and MLX converts a bool one in every call.

    ``mx.gather_mm`` is one kernel on a GPU in every float dtype; MLX's CPU
    backend runs it in float32 only, so while this is active a call in
    another dtype runs there in float32 between casts, which are surplus.

    Example:
        >>> with FastOps() as ops:
        ...     y = mx.fast.rms_norm(mx.ones((1, 8)), mx.ones((8,)), 1e-5)
        >>> ops.calls["rms_norm"], ops.surplus > 0
        (1, True)
    """

    NAMES = ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")

    def __init__(self):
        self.calls: Dict[str, int] = Counter()
        self.surplus = 0  # CPU kernels beyond the GPU's, over the calls so far
        self._sizes: Dict[Tuple, int] = {}
        self._real = {}

    def reset(self) -> None:
        self.calls, self.surplus = Counter(), 0

    def __enter__(self) -> "FastOps":
        for name in self.NAMES:
            self._real[name] = real = getattr(mx.fast, name)
            setattr(mx.fast, name, self._recording(name, real))
        self._real_gather_mm = mx.gather_mm
        mx.gather_mm = self._gather_mm
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._real.items():
            setattr(mx.fast, name, real)
        mx.gather_mm = self._real_gather_mm

    def _gather_mm(self, a, b, *args, **kwargs):
        self.calls["gather_mm"] += 1
        real = self._real_gather_mm
        if a.dtype == mx.float32 or mx.default_device() != mx.cpu:
            return real(a, b, *args, **kwargs)
        self.surplus += 3  # the casts of both inputs and of the product
        return real(a.astype(mx.float32), b.astype(mx.float32), *args, **kwargs).astype(a.dtype)

    def _recording(self, name, real):
        def call(*args, **kwargs):
            self.calls[name] += 1
            gpu = _gpu_kernels(name, args, kwargs)
            if gpu is not None:
                self.surplus += self._cpu_kernels(name, real, args, kwargs) - gpu
            return real(*args, **kwargs)

        return call

    def _cpu_kernels(self, name, real, args, kwargs) -> int:
        """Kernels of ``real``'s CPU graph on fresh inputs of the same shapes."""

        def leaf(a):
            return mx.zeros(a.shape, a.dtype) if isinstance(a, mx.array) else a

        key = (name,) + tuple(_signature(a) for a in args)
        key += tuple((k, _signature(v)) for k, v in sorted(kwargs.items()))
        if key not in self._sizes:
            args = [leaf(a) for a in args]
            kwargs = {k: leaf(v) for k, v in kwargs.items()}
            mx.eval([a for a in list(args) + list(kwargs.values()) if isinstance(a, mx.array)])
            self._sizes[key] = sum(count_kernels([real(*args, **kwargs)]).values())
        return self._sizes[key]


def _signature(a):
    return (tuple(a.shape), str(a.dtype)) if isinstance(a, mx.array) else repr(a)


def _gpu_kernels(name: str, args, kwargs) -> Optional[int]:
    """Kernels of a fused op on MLX's CUDA backend (``None``: its CPU graph runs there)."""
    if name != "scaled_dot_product_attention":
        return 1
    q, v = args[0], args[2]
    mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
    array_mask = isinstance(mask, mx.array)
    if q.dtype in (mx.float16, mx.bfloat16):  # cuDNN
        fused = all(d % 8 == 0 and d <= 128 for d in (q.shape[-1], v.shape[-1]))
    else:
        fused = q.shape[2] <= 1 and not array_mask
    if not fused:
        return None
    return 2 if array_mask and mask.dtype == mx.bool_ else 1


def graph_size(arrays: List[mx.array], ops: Optional[FastOps] = None) -> dict:
    """``nodes``, ``kernels`` and ``gpu_kernels`` (less ``ops.surplus``) of
    evaluating ``arrays``, and the kernels ``by_primitive``."""
    nodes = count_nodes(arrays)  # (one export of the graph for both counts)
    kernels = _kernels(nodes)
    cpu = sum(kernels.values())
    return dict(nodes=sum(nodes.values()), kernels=cpu,
                gpu_kernels=cpu - (ops.surplus if ops else 0),
                by_primitive=dict(kernels.most_common()))  # fmt: skip


@contextmanager
def recorded_steps(ops: Optional[FastOps] = None):
    """Records the graph of every step our decoder launches inside the block.

    Each launch's graph (pass, acceptance, next draft) is counted when it is
    built, before it is dispatched; so is what the step's host read then
    evaluates on its own (``mx.eval`` in ``finish``: the rows gathered to
    compact the caches after a tree). The list it yields receives one
    :func:`graph_size` per launch, with ``n`` (the tree's nodes),
    ``outside_pass`` (kernels not in the main logits' graph) and
    ``compaction`` (kernels evaluated by its host read, included in the
    totals). Pass a :class:`FastOps` that is active to count GPU kernels.
    """
    from . import decode  # (a profiling tool: the decoder does not import it)

    steps, launched, of_pending = [], {}, {}
    real_launch, real_finish = decode.Decoder.launch, decode.Decoder.finish
    real_async, real_eval = mx.async_eval, mx.eval

    def async_eval(*arrays):  # dispatched once counted, when the launch returns
        launched["arrays"] = _leaves(arrays)

    def launch(self, draft, after=None):
        if ops is not None:
            ops.reset()
        p = real_launch(self, draft, after)
        arrays = launched.pop("arrays")
        step = graph_size(arrays, ops)
        step.update(n=len(draft.layout), compaction=0)
        step["outside_pass"] = step["kernels"] - sum(count_kernels([p.out.logits]).values())
        steps.append(step)
        of_pending[id(p)] = step
        real_async(arrays)
        return p

    def finish(self, p, folded=False):
        step = of_pending.pop(id(p))

        def counted_eval(*arrays):
            k = sum(count_kernels(_leaves(arrays)).values())
            for key in ("kernels", "gpu_kernels", "compaction"):
                step[key] += k
            real_eval(*arrays)

        mx.eval = counted_eval
        try:
            return real_finish(self, p, folded)
        finally:
            mx.eval = real_eval

    decode.Decoder.launch, decode.Decoder.finish = launch, finish
    mx.async_eval = async_eval
    try:
        yield steps
    finally:
        decode.Decoder.launch, decode.Decoder.finish = real_launch, real_finish
        mx.async_eval, mx.eval = real_async, real_eval


def _leaves(tree) -> List[mx.array]:
    """The arrays of nested lists and tuples, in order."""
    if isinstance(tree, mx.array):
        return [tree]
    return [a for t in tree for a in _leaves(t)]
