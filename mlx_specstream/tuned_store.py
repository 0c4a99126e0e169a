"""The tuner's choices for models whose files it does not write, kept in the user's cache.

``python -m mlx_specstream.tune --save`` writes its choice into a model directory's
``config.json`` when the directory is one of ours (streams or a drafter section). It never
writes into a plain mlx-lm model, a checkpoint whose own MTP layers draft, or a pair of
directories (``--drafter``, ``--draft-model``): there it stores the command-line flags that
decode as it chose here instead, one entry per (model, drafter, draft model, device), and
``generate``, ``chat`` and ``server`` apply them where a call names no drafting flag.

The store is one JSON file, ``$MLX_SPECSTREAM_TUNED`` or else
``$XDG_CACHE_HOME/mlx_specstream/tuned.json`` (``~/.cache/...``). An entry holds each
directory's resolved path and a fingerprint of what was tuned (every ``config.json`` and
every safetensors file's name, size and header: shapes and dtypes, not the weights), so a
model converted or quantized again in the same place is not decoded with another model's
choice. Nothing here imports MLX.

Example:
    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "m").mkdir(); _ = (root / "m" / "config.json").write_text('{"a": 1}')
    >>> store = root / "tuned.json"
    >>> entry = save_flags(["--draft", "ngram"], "cpu:Linux-x86_64", root / "m", store=store)
    >>> find_flags("cpu:Linux-x86_64", root / "m", store=store)
    (['--draft', 'ngram'], None)
    >>> find_flags("gpu:Apple M2 Pro", root / "m", store=store)  # tuned on another device
    (None, None)
    >>> [e["flags"] for e in stored_entries(store)]
    [['--draft', 'ngram']]
    >>> _ = (root / "m" / "config.json").write_text('{"a": 2}')  # the model changed since
    >>> flags, note = find_flags("cpu:Linux-x86_64", root / "m", store=store)
    >>> flags, note.startswith("[INFO] Not applied: the choice tune stored for")
    (None, True)
    >>> forget("cpu:Linux-x86_64", root / "m", store=store), stored_entries(store)
    (True, [])
"""

import datetime
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import List, Optional, Tuple, Union

STORE_VARIABLE = "MLX_SPECSTREAM_TUNED"
PathLike = Union[str, Path]


def store_path() -> Path:
    """The store's file: ``$MLX_SPECSTREAM_TUNED``, else under ``$XDG_CACHE_HOME`` (or
    ``~/.cache``) as ``mlx_specstream/tuned.json``."""
    if os.environ.get(STORE_VARIABLE):
        return Path(os.environ[STORE_VARIABLE]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mlx_specstream" / "tuned.json"


def fingerprint(*directories: Optional[PathLike]) -> str:
    """A digest of what decides a tuned choice in ``directories`` (``None`` skipped): each
    ``config.json`` and each ``*.safetensors`` file's name, size and header (the tensors'
    names, dtypes, shapes and offsets), read without the weights.

    Raises:
        FileNotFoundError: a directory without ``config.json``.
        ValueError: a safetensors file whose header cannot be read, naming it.
    """
    digest = hashlib.sha256()
    for directory in directories:
        if directory is None:
            continue
        directory = Path(directory)
        config = directory / "config.json"
        if not config.exists():
            raise FileNotFoundError(f"{config} does not exist.")
        digest.update(b"config.json\0" + config.read_bytes())
        for f in sorted(directory.glob("*.safetensors")):
            digest.update(f"{f.name}\0{f.stat().st_size}\0".encode() + _header(f))
    return digest.hexdigest()


def _header(path: Path) -> bytes:
    """The JSON header of the safetensors file ``path`` (an 8-byte length, then the JSON)."""
    with open(path, "rb") as f:
        size = f.read(8)
        n = struct.unpack("<Q", size)[0] if len(size) == 8 else -1
        if n < 0 or n > path.stat().st_size - 8:
            raise ValueError(f"{path}: not a safetensors file (its header cannot be read)")
        return f.read(n)


def _key(device: str, model: PathLike, drafter, draft_model) -> dict:
    resolved = {k: None if p is None else str(Path(p).resolve())
                for k, p in (("model", model), ("drafter", drafter), ("draft_model", draft_model))}  # fmt: skip
    return dict(resolved, device=device)


def _for(entry: dict, key: dict) -> bool:
    """Whether ``entry`` is the one kept for ``key`` (:func:`_key`'s)."""
    return all(entry.get(k) == v for k, v in key.items())


def _store(store: Optional[PathLike]) -> Path:
    return store_path() if store is None else Path(store)


def _read(store: Path) -> List[dict]:
    if not store.exists():
        return []
    try:
        data = json.loads(store.read_text())
        entries = data["choices"]
        assert isinstance(entries, list)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(
            f"{store}: not a store of tuned choices ({e!r}); move it away or set "
            f"{STORE_VARIABLE} to another file"
        ) from None
    return entries


def save_flags(
    flags: List[str],
    device: str,
    model: PathLike,
    drafter: Optional[PathLike] = None,
    draft_model: Optional[PathLike] = None,
    measured: Optional[dict] = None,
    store: Optional[PathLike] = None,
) -> dict:
    """Stores ``flags`` for ``model`` (with ``drafter`` or ``draft_model``) on ``device``,
    replacing the entry an earlier tuning stored for the same ones, atomically.

    Args:
        flags: the command-line flags that decode as tuned (``--no-speculation``: plainly).
        measured: figures to keep beside them (tokens/s, versions).
        store: the file (default: :func:`store_path`).

    Returns:
        dict: the entry stored.
    """
    store = _store(store)
    key = _key(device, model, drafter, draft_model)
    entry = dict(key, fingerprint=fingerprint(model, drafter, draft_model),
                 flags=[str(f) for f in flags], measured=measured or {},
                 saved=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))  # fmt: skip
    entries = [e for e in _read(store) if not _for(e, key)] + [entry]
    _write(store, entries)
    return entry


def _write(store: Path, entries: List[dict]) -> None:
    store.parent.mkdir(parents=True, exist_ok=True)
    partial = store.with_name(f"{store.name}.{os.getpid()}.partial")  # (one per process)
    partial.write_text(json.dumps({"choices": entries}, indent=2) + "\n")
    os.replace(partial, store)


def stored_entries(store: Optional[PathLike] = None) -> List[dict]:
    """Every entry of the store (default: :func:`store_path`), oldest first."""
    return _read(_store(store))


def forget(
    device: str,
    model: PathLike,
    drafter: Optional[PathLike] = None,
    draft_model: Optional[PathLike] = None,
    store: Optional[PathLike] = None,
) -> bool:
    """Removes the entry for ``model`` (with ``drafter`` or ``draft_model``) on ``device``;
    whether there was one."""
    store = _store(store)
    key = _key(device, model, drafter, draft_model)
    entries = _read(store)
    kept = [e for e in entries if not _for(e, key)]
    if len(kept) == len(entries):
        return False
    _write(store, kept)
    return True


def find_flags(
    device: str,
    model: PathLike,
    drafter: Optional[PathLike] = None,
    draft_model: Optional[PathLike] = None,
    store: Optional[PathLike] = None,
) -> Tuple[Optional[List[str]], Optional[str]]:
    """The flags stored for ``model`` (with ``drafter`` or ``draft_model``) on ``device``.

    Returns:
        tuple: ``(flags, None)``; ``(None, None)`` where nothing is stored for them; ``(None,
        note)`` where the directories changed since they were tuned (the note says so).
    """
    store = _store(store)
    key = _key(device, model, drafter, draft_model)
    for entry in _read(store):
        if not _for(entry, key):
            continue
        if entry.get("fingerprint") != fingerprint(model, drafter, draft_model):
            return None, (
                f"[INFO] Not applied: the choice tune stored for {key['model']} on this device "
                f"({store}) was measured on other files (converted or quantized again since); "
                "run python -m mlx_specstream.tune --save again."
            )
        return list(entry["flags"]), None
    return None, None
