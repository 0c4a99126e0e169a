"""Builds the pretraining corpus of real code: every Python source this interpreter
has (standard library and site-packages), deduplicated by content, with the
evaluation material held out.

Run as ``python -m convert.code_corpus --out runs/code/corpus``.

* **Held out, never written:** the packages ``mlx``, ``mlx_lm`` and
  ``mlx_specstream`` (and anything named after them, such as an editable
  install's finder), and every file that resolves into this repository. They
  are the material the models are evaluated on.
* **Deduplicated** by the sha256 of the text: the first copy in path order is
  kept (vendored copies and version duplicates are common in site-packages).
* **Split by package:** a top-level package goes to ``eval.jsonl`` whole when the
  sha256 of its name is 0 modulo ``--eval-every``, so no evaluation package is
  trained on, and a package's split does not depend on what else is installed
  (machines with different site-packages agree on every package they share).

Writes ``train.jsonl`` and ``eval.jsonl`` (one ``{"path", "package", "text"}``
per file) and ``manifest.json`` (counts, bytes, the packages of each split,
what was held out and dropped, a digest of the contents).
"""

import argparse
import hashlib
import json
import platform
import site
import sysconfig
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from .corpus import module_of as package_of  # json/decoder.py -> json

HELD_OUT = ("mlx", "mlx_lm", "mlx_specstream")
REPO = Path(__file__).resolve().parent.parent
SKIPPED_PARTS = {"__pycache__", "site-packages", "dist-packages"}
MAX_BYTES = 1_000_000  # larger .py files are generated tables, not code
EVAL_EVERY = 20


def default_roots() -> List[Tuple[str, Path]]:
    """``(kind, root)`` of this interpreter's standard library and site-packages."""
    roots = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    for p in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]:
        roots.append(("site", Path(p)))
    roots += [("site", Path(p)) for p in site.getsitepackages()]
    seen, out = set(), []
    for kind, root in roots:
        if root.is_dir() and root.resolve() not in seen:
            seen.add(root.resolve())
            out.append((kind, root))
    return out


def is_held_out(package: str, path: Path, held_out: Sequence[str], repo: Optional[Path]) -> bool:
    """Whether a file is evaluation material: a held-out package, anything named
    after one (``mlx_lm-0.32.dist-info``, ``__editable___mlx_specstream_finder``),
    or a file of ``repo`` itself (not of an environment installed inside it)."""
    name = package.lower().replace("-", "_")
    for h in held_out:
        if name == h or name.startswith(h + "_") or (name.startswith("__editable__") and h in name):
            return True
    if repo is None or not path.resolve().is_relative_to(repo):
        return False
    # An environment inside the repository (.venv/.../site-packages) is not the repository.
    return not SKIPPED_PARTS.intersection(path.resolve().relative_to(repo).parts)


def is_eval_package(package: str, eval_every: int) -> bool:
    """Whether ``package`` is held out for evaluation: a fixed function of its name."""
    digest = hashlib.sha256(package.encode()).digest()
    return bool(eval_every) and int.from_bytes(digest[:8], "big") % eval_every == 0


def source_files(roots: Iterable[Tuple[str, Path]]) -> List[Tuple[str, Path, Path]]:
    """Sorted ``(kind, root, relative path)`` of every ``.py`` file below the roots.

    Standard-library roots skip their ``site-packages`` (listed as their own root)
    and test suites are kept: they are real code too.
    """
    files = []
    for kind, root in roots:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if SKIPPED_PARTS.intersection(rel.parts[:-1]):
                continue
            if any(part.endswith((".dist-info", ".egg-info")) for part in rel.parts[:-1]):
                continue
            files.append((kind, root, rel))
    return files


def build(
    out: Path,
    roots: Optional[Sequence[Tuple[str, Path]]] = None,
    held_out: Sequence[str] = HELD_OUT,
    repo: Optional[Path] = REPO,
    eval_every: int = EVAL_EVERY,
    max_bytes: int = MAX_BYTES,
) -> dict:
    """Writes the corpus into ``out`` (which must not hold one) and returns its manifest."""
    out = Path(out)
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out} already holds a corpus; refusing to overwrite it.")
    roots = list(roots) if roots is not None else default_roots()
    files = source_files(roots)
    packages = sorted({package_of(rel) for _, _, rel in files})
    eval_packages = {p for p in packages if is_eval_package(p, eval_every)}
    counts = {"train": 0, "eval": 0, "held_out": 0, "duplicates": 0, "too_large": 0}
    sizes = {"train": 0, "eval": 0}
    held, seen, written, digest = set(), set(), {"train": set(), "eval": set()}, hashlib.sha256()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w") as ftrain, open(out / "eval.jsonl", "w") as feval:
        for kind, root, rel in files:
            package = package_of(rel)
            if is_held_out(package, root / rel, held_out, repo):
                counts["held_out"] += 1
                held.add(package)
                continue
            data = (root / rel).read_bytes()
            if len(data) > max_bytes:
                counts["too_large"] += 1
                continue
            text = data.decode("utf-8", errors="replace")
            key = hashlib.sha256(text.encode()).digest()
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            split = "eval" if package in eval_packages else "train"
            record = {"path": f"{kind}:{rel}", "package": package, "text": text}
            (feval if split == "eval" else ftrain).write(json.dumps(record) + "\n")
            counts[split] += 1
            sizes[split] += len(text)
            written[split].add(package)
            digest.update(key)
    manifest = {
        "python": platform.python_version(),
        "roots": [f"{kind}:{root}" for kind, root in roots],
        "files": counts,
        "chars": sizes,
        "packages": {split: len(names) for split, names in written.items()},
        "eval_packages": sorted(written["eval"]),
        "held_out_packages": sorted(held),
        "held_out_rule": {"packages": list(held_out), "repo": str(repo) if repo else None},
        "sha256": digest.hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/code/corpus")
    p.add_argument("--eval-every", type=int, default=EVAL_EVERY,
                   help="one top-level package in N (by a hash of its name) goes to eval.jsonl")  # fmt: skip
    p.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    p.add_argument(
        "--root",
        action="append",
        default=None,
        metavar="KIND:PATH",
        help="A source root instead of this interpreter's (KIND: stdlib or site); repeatable",
    )
    args = p.parse_args()
    roots = None
    if args.root:
        roots = []
        for spec in args.root:
            kind, sep, path = spec.partition(":")
            if not sep or kind not in ("stdlib", "site") or not Path(path).is_dir():
                p.error(f"--root {spec!r}: expected stdlib:DIR or site:DIR with an existing DIR")
            roots.append((kind, Path(path)))
    manifest = build(
        Path(args.out), roots=roots, eval_every=args.eval_every, max_bytes=args.max_bytes
    )
    print(json.dumps({k: manifest[k] for k in ("files", "chars", "held_out_packages")}, indent=2))


if __name__ == "__main__":
    main()
