"""A draft vocabulary: the frequent tokens a drafter's head ranks (FR-Spec, EAGLE-3).

A drafter's head multiplies each drafting row by the whole ``(V, D)`` LM head. At a
real vocabulary that is most of a level's cost: on Qwen2-0.5B's shape the head is
136M of the model's 494M parameters, and an MTP layer 16M. Ranking only the ``K``
most frequent tokens cuts that product to ``K / V`` of it. It stays lossless: the
verifier still judges every draft against the base's full distribution; a token
outside the set is simply never drafted (at sampling, the draft distribution ``q``
is zero there, which rejection sampling takes as it is).

The vocabulary is a sorted list of token ids (``draft_vocab.safetensors``, key
``token_ids``), counted from text by ``python -m mlx_specstream.draft_vocab``. It
applies wherever a drafter runs the head on its own rows: MTP layers, Medusa heads,
ParallelSpec's mask rows, streams' logits taken after the pass (and the split pass's
stream rows), batch rows' streams. Stream logits computed inside the verify pass
(``stream_logits_in_pass``) share the main rows' head product: they are masked to the
ids, which saves nothing but keeps the drafts the same. The base's own logits, pruning
and training always use the full head.

Example:
    >>> ids = frequent_tokens(np.array([0, 5, 1, 9, 0, 2]), 3)
    >>> ids.tolist()  # the three most counted, in id order
    [1, 3, 5]
"""

import argparse
import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .model_parts import embedding_of, submodule
from .model_parts import vocab_size as model_vocab_size
from .streams import get_runtime

FILE = "draft_vocab.safetensors"
KEY = "token_ids"


def count_tokens(sequences: Iterable[Sequence[int]], vocab_size: int) -> np.ndarray:
    """How often each token id occurs in ``sequences``: ``(vocab_size,)`` int64.

    Raises:
        ValueError: an id outside ``[0, vocab_size)``.
    """
    counts = np.zeros(vocab_size, dtype=np.int64)
    for seq in sequences:
        ids = np.asarray(seq, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab_size - 1}).")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def frequent_tokens(counts: np.ndarray, size: int, keep: Sequence[int] = ()) -> np.ndarray:
    """The ``size`` most counted token ids, ``keep`` among them, sorted by id.

    Ties go to the lower id, so the choice is deterministic.

    Example: token 4 (say EOS, never counted) kept, then the two most counted,
    3 (9 times) and 1 (5 times):

    >>> frequent_tokens(np.array([0, 5, 1, 9, 0, 2]), 3, keep=[4]).tolist()
    [1, 3, 4]
    """
    counts = np.asarray(counts)
    keep = sorted(set(int(k) for k in keep))
    if not 0 < size <= counts.shape[0]:
        raise ValueError(f"size {size}: a draft vocabulary has 1 to {counts.shape[0]} tokens.")
    if len(keep) > size:
        raise ValueError(f"size {size} cannot hold the {len(keep)} tokens always kept.")
    order = np.lexsort((np.arange(counts.shape[0]), -counts))  # most counted, then lower id
    rest = order[~np.isin(order, keep)][: size - len(keep)].tolist()
    return np.array(sorted(keep + rest), dtype=np.int32)


def coverage(counts: np.ndarray, ids: np.ndarray) -> float:
    """The share of counted tokens that ``ids`` holds (1.0 for no tokens counted)."""
    total = int(np.sum(counts))
    return 1.0 if total == 0 else float(np.sum(np.asarray(counts)[ids])) / total


class DraftVocab:
    """The token ids a drafter ranks, and the LM heads restricted to them.

    Args:
        token_ids: distinct ids in ``[0, vocab_size)``.
        vocab_size: the width of the model's logits.
        source: where the ids came from (named in errors).
    """

    def __init__(self, token_ids: Sequence[int], vocab_size: int, source: str = "draft vocabulary"):
        ids = np.asarray(token_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{source}: {KEY} must be a non-empty 1-D array of integer ids.")
        if ids.min() < 0 or ids.max() >= vocab_size:
            bad = ids[(ids < 0) | (ids >= vocab_size)][0]
            raise ValueError(
                f"{source}: token id {bad} is outside this model's vocabulary "
                f"(0..{vocab_size - 1}); was it counted for another tokenizer?"
            )
        if np.unique(ids).size != ids.size:
            raise ValueError(f"{source}: {KEY} repeats a token id.")
        self.ids = mx.array(np.sort(ids).astype(np.int32))
        self.vocab_size = int(vocab_size)
        self.source = source
        self._restricted: Dict[int, Tuple[mx.array, nn.Module]] = {}
        self._member: Optional[mx.array] = None  # (V,) bool, for mask
        self._owner: Optional[tuple] = None  # (model, module holding its head, key)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def restrict(self, head: nn.Module) -> nn.Module:
        """A copy of ``head`` (a linear or embedding module, quantized or not, whose
        rows are the vocabulary) keeping only the rows of these ids; built once per
        head and kept while the head's weight is the same array."""
        if not isinstance(head.get("weight"), mx.array):  # (e.g. a LoRA-adapted head)
            raise ValueError(
                f"{self.source}: a draft vocabulary keeps rows of a linear or embedding head; "
                f"this head is a {type(head).__name__} with no weight of its own."
            )
        kept = self._restricted.get(id(head))
        if kept is not None and kept[0] is head["weight"]:
            return kept[1]
        rows = head["weight"].shape[0]
        assert rows == self.vocab_size, f"head has {rows} rows, vocabulary {self.vocab_size}"
        small = copy.copy(head)
        for key, value in head.items():  # (weight, scales, biases, bias: one row per token)
            if isinstance(value, mx.array) and value.ndim >= 1 and value.shape[0] == rows:
                small[key] = mx.take(value, self.ids, axis=0)
        self._restricted[id(head)] = (head["weight"], small)
        return small

    def widen(self, logits: mx.array) -> mx.array:
        """``(..., K)`` logits of the ids as ``(..., V)`` logits, ``-inf`` elsewhere."""
        assert logits.shape[-1] == len(self), f"{logits.shape[-1]} logits for {len(self)} ids"
        return widened(logits, self.ids, self.vocab_size)

    def mask(self, logits: mx.array) -> mx.array:
        """Full ``(..., V)`` logits with ``-inf`` outside the ids (where the head's
        product was shared with rows that need every token: stream logits in the pass)."""
        if self._member is None:
            self._member = mx.zeros((self.vocab_size,), dtype=mx.bool_).at[self.ids].add(True)
        return mx.where(self._member, logits, mx.array(-float("inf"), dtype=logits.dtype))

    @contextmanager
    def in_model(self, model: nn.Module):
        """Runs ``model``'s own head restricted to the ids (its final norm, soft-capping
        and scaling unchanged): the module holding the head is swapped for the
        restricted copy inside the block."""
        if self._owner is None or self._owner[0] is not model:  # (found once per model)
            self._owner = (model, *head_owner(model))
        _, parent, key = self._owner
        head = parent[key]
        parent[key] = self.restrict(head)
        try:
            yield
        finally:
            parent[key] = head

    def checked(self, logits: mx.array, model: nn.Module) -> mx.array:
        """Widens logits the restricted head gave; refuses a model whose logits did not
        come from the module :func:`head_owner` found (its width is then ``V``)."""
        if logits.shape[-1] != len(self):
            raise ValueError(
                f"{type(model).__module__}: its logits do not come from the module holding "
                f"its LM head ({'.'.join(head_path(model))}), so a draft vocabulary "
                "cannot restrict them."
            )
        return self.widen(logits)


def widened(logits: mx.array, ids: mx.array, width: int) -> mx.array:
    """``(..., K)`` logits of the tokens ``ids`` ``(K,)`` (in any order: a draft vocabulary,
    EAGLE-3's ``d2t`` targets, a Medusa ``token_map``) as ``(..., width)`` logits over every
    token, ``-inf`` elsewhere."""
    out = mx.full(logits.shape[:-1] + (width,), -float("inf"), dtype=logits.dtype)
    out[..., ids] = logits
    return out


def head_path(model: nn.Module) -> Tuple[str, ...]:
    """Where ``model``'s LM head is: its ``lm_head``, else its one linear module outside
    the layers with a row per token (GPT-NeoX's ``embed_out``), else its tied input
    embedding. Found once per attached runtime (a drafter reading the base's head asks
    at every level; the search walks every module)."""
    rt = getattr(model, "speculative_streams", None)
    known = getattr(rt, "_head_path", None)
    if known is not None:
        return known
    path = _find_head_path(model)
    if rt is not None:
        rt._head_path = path
    return path


def _find_head_path(model: nn.Module) -> Tuple[str, ...]:
    text = getattr(model, "language_model", None) or model  # (a vision-language wrapper's)
    if "lm_head" in text:
        target = text["lm_head"]
    else:
        rows = model_vocab_size(model)
        found = [m for name, m in model.named_modules()
                 if isinstance(m, (nn.Linear, nn.QuantizedLinear)) and m.weight.shape[0] == rows
                 and not any(f".{n}." in f".{name}." for n in ("layers", "h", "blocks"))]  # fmt: skip
        target = found[0] if len(found) == 1 else embedding_of(model)
    for name, module in model.named_modules():
        if module is target:
            return tuple(name.split("."))
    raise ValueError(f"{type(model).__module__}: cannot find the module holding its LM head.")


def head_owner(model: nn.Module) -> Tuple[nn.Module, str]:
    """The module holding ``model``'s LM head, and the head's key in it."""
    *parent, key = head_path(model)
    return (submodule(model, ".".join(parent)) if parent else model), key


def head_rows(model: nn.Module) -> int:
    """How many rows ``model``'s LM head has: the width of its logits."""
    parent, key = head_owner(model)
    return int(parent[key]["weight"].shape[0])


def save_draft_vocab(path: Union[str, Path], ids: np.ndarray, metadata: Dict[str, str]) -> Path:
    """Writes ``ids`` to ``path`` (a new file: an existing one is never overwritten)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {KEY: mx.array(np.asarray(ids, dtype=np.int32))}
    mx.save_safetensors(str(path), arrays, metadata={k: str(v) for k, v in metadata.items()})
    return path


def read_draft_vocab(path: Union[str, Path], vocab_size: int) -> DraftVocab:
    """The draft vocabulary in ``path`` for a model whose logits have ``vocab_size``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: no ``token_ids`` in it, or ids this model does not have.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"draft vocabulary {path} does not exist.")
    arrays = mx.load(str(path))
    if KEY not in arrays:
        raise ValueError(f"{path}: no {KEY!r} tensor (it has {sorted(arrays)}).")
    return DraftVocab(np.array(arrays[KEY]), vocab_size, source=str(path))


def use_draft_vocab(model: nn.Module, vocab: Union[None, str, Path, Sequence[int], DraftVocab]):
    """Makes ``model``'s drafter rank only ``vocab``'s tokens (a file, ids or a
    :class:`DraftVocab`); ``None`` ranks every token again.

    Raises:
        ValueError: a model without speculative streams or a drafter attached.
    """
    rt = get_runtime(model)
    if vocab is None:
        rt.draft_vocab = None
        return None
    if getattr(rt.drafter, "own_draft_vocab", False):
        raise ValueError(
            f"draft_vocab={vocab if isinstance(vocab, (str, Path)) else '...'!s}: this model's "
            f"{type(rt.drafter).__name__} ranks a draft vocabulary of its own (its d2t)."
        )
    rows = head_rows(model)
    if isinstance(vocab, (str, Path)):
        vocab = read_draft_vocab(vocab, rows)
    elif not isinstance(vocab, DraftVocab):
        vocab = DraftVocab(vocab, rows)
    elif vocab.vocab_size != rows:
        raise ValueError(
            f"{vocab.source}: made for logits of {vocab.vocab_size} tokens; this model's "
            f"have {rows}."
        )
    rt.draft_vocab = vocab
    return vocab


def drafts_by_head(model: nn.Module) -> bool:
    """Whether ``model`` has streams or a drafter whose head ranks tokens."""
    rt = getattr(model, "speculative_streams", None)
    return rt is not None and (rt.streams is not None or rt.drafter is not None)


# ---- python -m mlx_specstream.draft_vocab -------------------------------------------
DEFAULT_SIZE = 32768  # EAGLE-3's and FR-Spec's choice for 128k-152k vocabularies
WINDOW = 4096  # tokens per text window read (counting needs no shorter ones)


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mlx_specstream.draft_vocab",
        description="Count a model's tokens in text and write the draft vocabulary: the "
        "most frequent tokens, the only ones its drafter then ranks.",
    )
    parser.add_argument(
        "--model", default=None, help="Model directory or repo. Default: the embedded model."
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="Text to count, as mlx_specstream.train reads it: JSONL ('text', 'prompt'/"
        "'completion' or 'messages'), an mlx_lm.lora directory, or a directory of text/code.",
    )
    parser.add_argument("--out", required=True, help="The file to write (a new one).")
    parser.add_argument(
        "--size",
        type=int,
        default=DEFAULT_SIZE,
        help=f"How many tokens the drafter ranks (default: {DEFAULT_SIZE}).",
    )
    return parser


def main(argv=None):
    from .train_data import DataError, load_examples
    from .utils import load, resolve_model_path

    args = setup_arg_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"--out {out} already exists; refusing to overwrite it.")
    model, tokenizer = load(
        None if args.model is None else str(resolve_model_path(args.model)),
        lazy=True,
        allow_plain=True,
        draft_vocab=False,
    )
    rows = head_rows(model)
    check_size(args.size, rows, "--size")
    train, valid, _ = load_examples(args.data, tokenizer, WINDOW, 0)
    ids, shares, text = vocab_of_examples(train, valid, tokenizer, rows, args.size)
    if not shares["tokens_counted"]:
        raise DataError(f"--data {' '.join(args.data)}: no token to count.")
    save_draft_vocab(out, ids, {"vocab_size": rows, **shares})
    print(text)
    print(f"Wrote {out}. Use it: --draft-vocab {out} (or load(..., draft_vocab=...)).")


def check_size(size: int, rows: int, flag: str) -> None:
    """Refuses a draft vocabulary of ``size`` tokens for a head of ``rows``."""
    if not 0 < size < rows:
        raise ValueError(
            f"{flag} {size}: a draft vocabulary holds fewer tokens than the model's "
            f"{rows} (and at least 1)."
        )


def vocab_of_examples(train, valid, tokenizer, rows: int, size: int):
    """The ``size`` tokens most frequent in the completions of ``train`` examples (what
    drafts predict), the tokenizer's EOS among them; their coverage of ``train``'s and
    ``valid``'s completions, and a line saying so.

    Returns:
        tuple: ``(ids, shares, text)``: ``shares`` has ``tokens_counted``,
        ``coverage`` and, with ``valid``, ``held_out_coverage``.
    """
    counts = count_tokens([e["input_ids"][e["prompt_len"] :] for e in train], rows)
    eos = getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id]
    ids = frequent_tokens(counts, size, keep=[t for t in eos if t is not None and t < rows])
    shares = {"tokens_counted": int(counts.sum()), "coverage": coverage(counts, ids)}
    if valid:
        held = count_tokens([e["input_ids"][e["prompt_len"] :] for e in valid], rows)
        shares["held_out_coverage"] = coverage(held, ids)
    text = (
        f"Counted {int(counts.sum()):,} tokens ({int((counts > 0).sum()):,} distinct of "
        f"{rows:,}); the {len(ids):,} kept cover {100 * shares['coverage']:.2f}% of them"
    )
    if valid:
        text += f", {100 * shares['held_out_coverage']:.2f}% of the held-out set's"
    return ids, shares, text + "."


if __name__ == "__main__":
    main()
