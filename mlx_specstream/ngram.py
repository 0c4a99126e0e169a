"""Prompt-lookup drafting: continue the text from where its last n tokens
occurred before (Saxena 2023; transformers' ``prompt_lookup_num_tokens``).

The draft is a deterministic function of the tokens so far, so the tree
verifier keeps the output exact, greedy or sampled.
"""

from typing import List, Sequence

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
