"""Builds the code corpus: Python standard-library sources, split by module.

Run as ``python -m convert.corpus --out runs/default/corpus``. The file list is
deterministic (sorted paths of this interpreter's standard library, test
suites excluded) and every 20th top-level module goes to evaluation, so no
evaluation file is ever trained on. Writes ``train.jsonl`` and ``eval.jsonl``
(one ``{"path", "text"}`` per file) and ``manifest.json``.
"""

import argparse
import hashlib
import json
import platform
import sysconfig
from pathlib import Path

EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
EVAL_EVERY = 20


def stdlib_files(root: Path):
    """Sorted ``.py`` files of the standard library, without test suites."""
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS.intersection(rel.parts[:-1]):
            continue
        files.append(rel)
    return files


def module_of(rel: Path) -> str:
    """The top-level module a file belongs to (``json/decoder.py`` -> ``json``)."""
    return rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]


def build(out: Path, root: Path = None):
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out.mkdir(parents=True, exist_ok=True)
    files = stdlib_files(root)
    modules = sorted({module_of(f) for f in files})
    eval_modules = set(modules[EVAL_EVERY // 2 :: EVAL_EVERY])
    counts = {"train": 0, "eval": 0}
    digest = hashlib.sha256()
    with open(out / "train.jsonl", "w") as ftrain, open(out / "eval.jsonl", "w") as feval:
        for rel in files:
            text = (root / rel).read_text(encoding="utf-8", errors="replace")
            split = "eval" if module_of(rel) in eval_modules else "train"
            (feval if split == "eval" else ftrain).write(
                json.dumps({"path": str(rel), "text": text}) + "\n"
            )
            counts[split] += 1
            digest.update(str(rel).encode() + text.encode())
    manifest = {
        "python": platform.python_version(),
        "stdlib": str(root),
        "files": counts,
        "eval_modules": sorted(eval_modules),
        "sha256": digest.hexdigest(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/default/corpus")
    parser.add_argument(
        "--stdlib", default=None, help="Standard library root (default: this Python's)"
    )
    args = parser.parse_args()
    print(json.dumps(build(Path(args.out), args.stdlib), indent=2))


if __name__ == "__main__":
    main()
