"""An LRU of prompt caches shared across requests, as ``mlx_lm.server`` keeps one.

A follow-up turn of a conversation starts with the tokens of the earlier
turns. The server keeps the KV caches of finished requests, keyed by the
tokens they hold, and starts a new request from the entry that shares the
longest prefix with its prompt, trimmed to that prefix, so only the new tokens
are prefilled.

Like ``mlx_lm.server``'s ``LRUPromptCache``:

* an entry whose key is a prefix of the prompt (or equal to it) is *taken out*
  of the LRU while the request uses it, so two requests never share a cache
  object; the request puts it back, longer, when it ends;
* an entry that runs past the prompt (a regenerated answer, an edited turn) is
  deep-copied and the copy trimmed, so the longer conversation stays cached;
* at least one prompt token is always left to feed, so an exact match is
  trimmed by one token;
* a cache with recurrent layers (a hybrid model's) cannot be trimmed: it serves
  only prompts that its whole key begins, so the entries whose keys are its
  prefixes stay, and the server also keeps a copy taken when a prompt (all but
  its last token) is in, which serves any later prompt that starts with it
  (a regenerated answer, a follow-up whose history was rendered otherwise); a
  state-space model's cache, whose layers do not count their tokens, is not
  kept;
* inserting an entry drops the entries whose keys are prefixes of its key
  (trimming the new one gives them back), then evicts the least recently used
  entries beyond ``max_size`` entries or ``max_bytes`` bytes.

Caches are made and trimmed with :mod:`mlx_specstream.cache` only, so an
attached drafter's own state is trimmed with them. A ParallelSpec drafter's
cached row ``i`` pairs token ``i``'s hidden state with token ``i + 1`` (see
:class:`mlx_specstream.drafters.DrafterState`); when the token after the
reused prefix differs from the one its last row was paired with, one more
token is trimmed, so the drafter's context is exactly what a from-scratch
request would build.
"""

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from mlx_lm.models.cache import can_trim_prompt_cache

from .cache import cache_tokens, trim_prompt_cache, trimmable_tokens


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _is_prefix(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) <= len(b) and common_prefix(a, b) == len(a)


def cache_nbytes(cache) -> int:
    """Bytes held by a prompt cache: every layer, plus a drafter's own KV cache."""
    n = sum(c.nbytes for c in cache)
    state = getattr(cache, "drafter_state", None)
    if state is not None and getattr(state, "cache", None) is not None:
        n += state.cache.nbytes
    return n


def pairs_next_token(cache) -> bool:
    """Whether the cache carries a drafter state whose rows pair each token
    with the next one (ParallelSpec); streams and Medusa keep no such rows."""
    state = getattr(cache, "drafter_state", None)
    return state is not None and bool(getattr(state, "needs_prompt", False))


@dataclass
class Entry:
    key: List[int]  # the tokens the cache holds, in order
    cache: list
    nbytes: int
    # The token that followed ``key`` when the cache was made (None: unknown).
    # A pairing drafter's last row was built with it.
    next_token: Optional[int] = None


class PromptCacheLRU:
    """Prompt caches of earlier requests, looked up by longest common prefix.

    Args:
        max_size (int): most entries kept (``mlx_lm.server``'s
          ``--prompt-cache-size``, default 10). ``0`` keeps nothing.
        max_bytes (int, optional): most bytes kept over all entries
          (``--prompt-cache-bytes``). Default: no limit.

    Thread-safe; the cache objects it hands out belong to the caller until
    :meth:`insert` takes them back.
    """

    def __init__(self, max_size: int = 10, max_bytes: Optional[int] = None):
        if not (isinstance(max_size, int) and max_size >= 0):
            raise ValueError(f"max_size={max_size!r} must be an integer >= 0")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes!r} must be >= 0")
        self.max_size, self.max_bytes = max_size, max_bytes
        self._entries: "OrderedDict[Tuple[int, ...], Entry]" = OrderedDict()  # oldest first
        self._lock = threading.RLock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the kept caches (not by those taken out and in use)."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> List[List[int]]:
        """The cached token prefixes, least recently used first."""
        with self._lock:
            return [list(k) for k in self._entries]

    @staticmethod
    def reusable(entry: Entry, tokens: Sequence[int], min_new: int = 1) -> int:
        """How many of ``tokens`` the entry can serve: the common prefix, but
        leaving at least ``min_new`` tokens to feed, and one token less when a
        pairing drafter's last kept row was built with another next token; none
        when its window layers cannot be trimmed back that far."""
        r = min(common_prefix(entry.key, tokens), len(tokens) - min_new)
        if not can_trim_prompt_cache(entry.cache):  # recurrent layers: the whole key or nothing
            return r if r == len(entry.key) else 0
        if r > 0 and pairs_next_token(entry.cache):
            if r == len(entry.key) and entry.cache.drafter_state.pending_hidden is not None:
                return r  # its last token's state waits to be paired with tokens[r]
            old_next = entry.key[r] if r < len(entry.key) else entry.next_token
            if old_next != tokens[r]:
                r -= 1
        if len(entry.key) - r > trimmable_tokens(entry.cache):
            return 0  # (window layers that dropped rows: not that far back)
        return max(r, 0)

    def fetch(self, tokens: Sequence[int], min_new: int = 1) -> Tuple[Optional[list], int]:
        """The cache sharing the longest prefix with ``tokens``, trimmed to it.

        Args:
            tokens: the request's whole prompt.
            min_new (int): the fewest tokens the request must feed itself
              (at least 1; a repetition penalty's context size, so its
              history is the same as without the cache).

        Returns:
            tuple: ``(cache, n)``: the cache holds ``tokens[:n]`` (``n <=
            len(tokens) - min_new``), so the request feeds ``tokens[n:]``;
            ``(None, 0)`` when no entry can serve a token.
        """
        min_new = max(min_new, 1)
        with self._lock:
            best, best_rank = None, (0, False)
            for entry in self._entries.values():
                # Most tokens reused; on a tie, an entry that is taken without a copy.
                rank = (self.reusable(entry, tokens, min_new), _is_prefix(entry.key, tokens))
                if rank[0] > 0 and rank > best_rank:
                    best, best_rank = entry, rank
            best_r, whole = best_rank
            if best is None:
                return None, 0
            if whole:  # the key is a prefix of the prompt (or equal): take it out
                del self._entries[tuple(best.key)]
                cache = best.cache
            else:
                # It runs past the prompt: keep it, and trim a copy.
                self._entries.move_to_end(tuple(best.key))
                cache = copy.deepcopy(best.cache)
        trim_prompt_cache(cache, len(best.key) - best_r)
        return cache, best_r

    def insert(self, key: Sequence[int], cache, next_token: Optional[int] = None) -> None:
        """Keeps ``cache``, which holds exactly the tokens ``key``.

        Entries whose keys are prefixes of ``key`` are dropped when ``cache``
        can be trimmed back to them (this one, trimmed, serves them), then the least
        recently used entries go until the limits hold.
        """
        key = list(key)
        if not key or self.max_size == 0:
            return
        if cache_tokens(cache) != len(key):
            raise ValueError(
                f"the cache holds {cache_tokens(cache)} tokens but its key has {len(key)}"
            )
        entry = Entry(key, cache, cache_nbytes(cache), next_token)
        with self._lock:
            # (a cache that cannot be trimmed back to a prefix cannot give it back: it stays)
            back = trimmable_tokens(cache) if can_trim_prompt_cache(cache) else 0
            for k in [k for k in self._entries if _is_prefix(k, key)]:
                if len(key) - len(k) <= back:
                    self._entries.pop(k)
            self._entries.pop(tuple(key), None)
            self._entries[tuple(key)] = entry
            self._evict()

    def insert_finished(self, sequence: Sequence[int], cache) -> None:
        """Keeps the cache of a finished (or closed) generation over ``sequence``
        (its whole prompt, then the generated tokens).

        The cache's offset says how many of them it holds (every generated
        token, as mlx-lm's loop leaves its cache, or fewer after an error). The
        token after those is kept as :attr:`Entry.next_token`. A cache with no
        KV layer (a state-space model) cannot say, and is not kept.
        """
        n = cache_tokens(cache)
        if n is not None and 0 < n <= len(sequence):
            nxt = sequence[n] if n < len(sequence) else None
            self.insert(sequence[:n], cache, next_token=nxt)

    def trim_to(self, n_entries: Optional[int] = None, n_bytes: Optional[int] = None) -> None:
        """Evicts least recently used entries down to the given limits."""
        with self._lock:
            self._evict(n_entries, n_bytes)

    def _evict(self, n_entries=None, n_bytes=None):
        n_entries = self.max_size if n_entries is None else n_entries
        n_bytes = self.max_bytes if n_bytes is None else n_bytes
        while len(self._entries) > n_entries:
            self._entries.popitem(last=False)
        if n_bytes is not None:
            total = self.nbytes
            while self._entries and total > n_bytes:
                _, e = self._entries.popitem(last=False)
                total -= e.nbytes
