"""Prompt-lookup drafting: continue the text from where its last n tokens
occurred before (Saxena 2023; transformers' ``prompt_lookup_num_tokens``).

The draft is a deterministic function of the tokens so far, so the tree
verifier keeps the output exact, greedy or sampled. :func:`ngram_draft` is the
definition (it rescans the whole history); :class:`NgramIndex` gives the same
drafts from an index updated per token, which the decoder uses so that a step's
lookup does not grow with the context. :func:`device_lookup` gives them on the
device, for pipelined steps whose history the host has not read yet, and
:func:`device_lookups` for every row of a batch.
"""

from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

NGRAM_MAX = 3  # longest suffix matched (transformers' max_matching_ngram_size is 2)
NGRAM_DRAFT_TOKENS = 10  # tokens drafted per match (transformers' default)


def ngram_draft(
    history: Sequence[int],
    max_tokens: int = NGRAM_DRAFT_TOKENS,
    max_ngram: int = NGRAM_MAX,
    min_ngram: int = 1,
) -> List[int]:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence
    of the longest suffix of ``history`` (``max_ngram`` tokens down to
    ``min_ngram``) that occurred before.

    Example:
        >>> ngram_draft([5, 1, 2, 3, 4, 9, 1, 2], max_tokens=2)
        [3, 4]
        >>> ngram_draft([1, 2, 7, 1, 2, 8, 1, 2], max_tokens=3)   # the latest match wins
        [8, 1, 2]
        >>> ngram_draft([1, 2, 3], max_tokens=3)
        []

    Args:
        history: the prompt and the tokens generated so far.
        max_tokens (int): the longest draft.
        max_ngram, min_ngram (int): suffix lengths tried, longest first.

    Returns:
        list: the draft, empty when no suffix occurred before.
    """
    h = np.asarray(history, dtype=np.int64)
    n_hist = h.size
    for n in range(min(max_ngram, n_hist - 1), min_ngram - 1, -1):
        suffix = h[n_hist - n :]
        # Windows that start before the suffix itself and are followed by a token.
        windows = np.lib.stride_tricks.sliding_window_view(h[: n_hist - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return h[start : start + max_tokens].tolist()
    return []


class NgramIndex:
    """The tokens so far and, for each n-gram of them, where the tokens after its
    latest occurrences are: :func:`ngram_draft`'s drafts in O(``max_ngram``) per
    appended token and per lookup, whatever the length of the history.

    Example:
        >>> index = NgramIndex([5, 1, 2, 3, 4, 9])
        >>> index.extend([1, 2])
        >>> index.draft(2)   # "1 2" was followed by "3 4", as ngram_draft finds
        [3, 4]
        >>> index.extend([7]); index.draft(3)   # "7" never occurred before
        []
        >>> index = NgramIndex([1, 2, 3, 1, 2, 4, 1, 2], candidates=2)
        >>> index.drafts(2)   # the latest two distinct continuations of "1 2"
        [[4, 1], [3, 1]]

    Args:
        tokens (iterable): the history to start from (the prompt).
        max_ngram, min_ngram (int): suffix lengths tried, longest first.
        candidates (int): the most drafts :meth:`drafts` gives; they are found
          among the latest ``OCCURRENCES_PER_CANDIDATE * candidates`` occurrences
          of each suffix.
    """

    OCCURRENCES_PER_CANDIDATE = 4

    def __init__(self, tokens: Iterable[int] = (), max_ngram: int = NGRAM_MAX, min_ngram: int = 1,
                 candidates: int = 1):  # fmt: skip
        self.tokens: List[int] = []
        self.max_ngram, self.min_ngram, self.candidates = max_ngram, min_ngram, candidates
        self._keep = candidates * self.OCCURRENCES_PER_CANDIDATE if candidates > 1 else 1
        # _next[n][gram] = indices of the tokens that followed gram's latest occurrences
        # (the latest last).
        self._next: List[Dict[Tuple[int, ...], List[int]]] = [{} for _ in range(max_ngram + 1)]
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        """Appends ``tokens``; each one becomes the follower of the n-grams before it."""
        h, nexts, keep = self.tokens, self._next, self._keep
        for t in tokens:
            i = len(h)
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                at = nexts[n].setdefault(tuple(h[i - n : i]), [])
                at.append(i)
                if len(at) > keep:
                    del at[0]
            h.append(int(t))

    def draft(self, max_tokens: int = NGRAM_DRAFT_TOKENS) -> List[int]:
        """Equals ``ngram_draft(self.tokens, max_tokens, max_ngram, min_ngram)``."""
        h, end = self.tokens, len(self.tokens)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            at = self._next[n].get(tuple(h[end - n :]))
            if at:
                return h[at[-1] : at[-1] + max_tokens]
        return []

    def drafts(self, max_tokens: int = NGRAM_DRAFT_TOKENS) -> List[List[int]]:
        """Up to ``candidates`` distinct drafts: the tokens after each kept occurrence
        of the longest suffix that occurred before, the latest first, then those of
        shorter suffixes. The first is :meth:`draft`'s."""
        h, end, out = self.tokens, len(self.tokens), []
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            for start in reversed(self._next[n].get(tuple(h[end - n :]), ())):
                chain = h[start : start + max_tokens]
                if chain not in out:
                    out.append(chain)
                    if len(out) == self.candidates:
                        return out
        return out


def device_lookup(history, length, max_tokens: int, max_ngram: int = NGRAM_MAX, min_ngram: int = 1):
    """:func:`ngram_draft` on the device, over a history whose length only the
    device may know yet (a pipelined step's). Fixed shapes: the draft always
    has ``max_tokens`` tokens, of which the first ``count`` are
    :func:`ngram_draft`'s. Where the text runs out before ``max_tokens``, the
    rest repeats the matched continuation, as text that loops would go on
    (any tokens are safe to verify; these are the likeliest filler).

    Example:
        >>> import mlx.core as mx
        >>> h = mx.array([5, 1, 2, 3, 4, 9, 1, 2, 0, 0, 0, 0])   # 8 tokens, then room
        >>> draft, count = device_lookup(h, mx.array(8), 3)
        >>> draft.tolist()[: count.item()]   # as ngram_draft(h[:8], 3)
        [3, 4, 9]
        >>> h = mx.array([7, 1, 2, 1, 2, 1, 2, 0, 0, 0, 0, 0])  # "1 2" loops
        >>> draft, count = device_lookup(h, mx.array(7), 5)
        >>> draft.tolist(), count.item()   # ngram_draft gives [1, 2]; then the loop goes on
        ([1, 2, 1, 2, 1], 2)

    Args:
        history (mx.array): ``(C,)`` integer buffer holding the tokens so far in
          its first ``length`` entries.
        length (mx.array): scalar, the number of tokens so far.
        max_tokens (int): the draft's length.
        max_ngram, min_ngram (int): suffix lengths tried, longest first.

    Returns:
        tuple: ``(draft, count)``: ``(max_tokens,)`` tokens and a scalar.
    """
    draft, count = device_lookups(history[None], length.reshape(1), max_tokens, max_ngram,
                                  min_ngram)  # fmt: skip
    return draft[0], count[0]


def device_lookups(history, lengths, max_tokens: int, max_ngram: int = NGRAM_MAX,
                   min_ngram: int = 1):  # fmt: skip
    """:func:`device_lookup` for every row of a batch at once: row ``b`` of
    ``history`` holds its tokens so far in its first ``lengths[b]`` entries.

    Example:
        >>> import mlx.core as mx
        >>> h = mx.array([[5, 1, 2, 3, 4, 9, 1, 2], [1, 2, 7, 1, 2, 8, 1, 2]])
        >>> drafts, counts = device_lookups(h, mx.array([8, 5]), 2)
        >>> drafts.tolist(), counts.tolist()   # ngram_draft of [5, 1, 2, .., 1, 2], [1, 2, 7, 1, 2]
        ([[3, 4], [7, 1]], [2, 2])

    Args:
        history (mx.array): ``(B, C)`` integer buffer.
        lengths (mx.array): ``(B,)``, the number of tokens in each row.
        max_tokens (int): the drafts' length.
        max_ngram, min_ngram (int): suffix lengths tried, longest first.

    Returns:
        tuple: ``(drafts, counts)``: ``(B, max_tokens)`` tokens and ``(B,)``.
    """
    import mlx.core as mx  # (the module's host index is numpy only)

    # Every suffix length at once, each window named by its last token e:
    # agree[b, j, e] says history[b, e - j] == history[b, length - 1 - j], and a window
    # of n tokens ending at e matches the suffix where agree[b, 0 .. n - 1, e] all hold.
    (B, C), J = history.shape, min(max_ngram, history.shape[1])
    length = lengths.astype(mx.int32)[:, None, None]  # (B, 1, 1)
    e = mx.arange(C, dtype=mx.int32)
    j = mx.arange(J, dtype=mx.int32)[:, None]
    at = e - j  # (J, C)
    last = mx.maximum(length[:, :, 0] - 1 - j[:, 0], 0)  # (B, J), the suffix, last token first
    suffix = mx.take_along_axis(history, last, axis=1)[..., None]
    windows = mx.take(history, mx.maximum(at, 0).reshape(-1), axis=1).reshape(B, J, C)
    agree = (windows == suffix) & (at >= 0)
    match = mx.cumprod(agree.astype(mx.int32), axis=1) > 0  # (B, J, C): n = j + 1 tokens
    # Windows followed by a token before the suffix, for n from min_ngram to length - 1.
    match = match & (e <= length - 2) & (j + 1 <= length - 1) & (j + 1 >= min_ngram)
    # The longest n that matched, then its latest window: one key per (n, e).
    key = mx.max(mx.where(match, j * C + e, -1).reshape(B, -1), axis=1)
    found = key >= 0
    start = mx.where(found, key % C + 1, 0)  # the token after the match (no match: any)
    length = length.reshape(B)
    period = mx.maximum(length - start, 1)  # tokens after the match, repeated past the end
    steps = mx.arange(max_tokens, dtype=mx.int32)
    drafts = mx.take_along_axis(history, start[:, None] + steps % period[:, None], axis=1)
    counts = mx.where(found, mx.minimum(max_tokens, length - start), 0)
    return drafts, counts
