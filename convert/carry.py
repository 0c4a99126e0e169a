"""Carries a build's working directory between machines that keep nothing.

``python -m convert.carry collect WORK OUT [--items base,tokenizer]`` /
``python -m convert.carry restore CARRIED WORK``

The GPU machine is lent for minutes, forgets everything between loans, takes at
most 64 MiB in per run (the tracked tree included) and gives back at most 8
files of 16 MB. A build therefore runs there in stages, and what a later stage
needs travels back and forth in small pieces:

* one **item** per top-level entry of the working directory (``base``,
  ``tokenizer``, ``ss-lossless``, ``distilled``, ...; top-level files form the
  item ``top``), each an xz-compressed tar cut into parts of at most
  ``--part-mb`` MB, with a sha256 per part in ``ITEM.carry.json``. A run brings
  back the items it made; a later run takes only the items its stages need.
* **left behind**, because every machine rebuilds them: the corpus (its
  manifest travels as ``corpus-expected.json``, and the build refuses a
  rebuilt corpus that differs), tokenized caches, Trainer checkpoints, MLX
  conversions.
* **large weights**: a model directory that has a ``transport`` pack
  (``convert.transport``: 8-bit, the build's "round trip" stage made it, and its
  unpacked weights are the model) travels as the pack. A fine-tune directory whose
  weights are the base's own, tensor for tensor (a frozen base, a LoRA kept as an
  adapter, a drafter), travels without them; ``restore`` copies them from the base.
"""

import argparse
import io
import json
import shutil
import tarfile
from pathlib import Path

from .transport import load_weights, read_parts, unpack, write_parts

LEFT_BEHIND_DIRS = {"checkpoints", "mlx", "corpus", "model-trained"}
FROM_BASE = "carried-from-base.json"
WEIGHTS_GLOB = "model*.safetensors"
STAGE_TIMES = "stage_times.json"


def _weights_equal(a: Path, b: Path) -> bool:
    """Whether two model directories hold the same tensors (names, dtypes, values)."""
    ta, tb = load_weights(a, WEIGHTS_GLOB), load_weights(b, WEIGHTS_GLOB)
    if ta.keys() != tb.keys():
        return False
    return all(ta[k].dtype == tb[k].dtype and bool((ta[k] == tb[k]).all()) for k in ta)


def _members(work: Path, item: str):
    """``(path, arcname)`` of the files an item carries."""
    base_model = work / "base" / "model"
    if item == "top":
        out = [(p, p.name) for p in sorted(work.iterdir()) if p.is_file()]
        manifest = work / "corpus" / "manifest.json"
        if manifest.exists():
            out.append((manifest, "corpus-expected.json"))
        return out
    root = work / item
    skip_dirs = {root / "model"} if (root / "transport" / "transport.json").exists() else set()
    from_base = (
        item != "base"
        and (root / "config.json").exists()
        and any(root.glob(WEIGHTS_GLOB))
        and base_model.exists()
        and _weights_equal(root, base_model)
    )
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(work)
        if not p.is_file() or LEFT_BEHIND_DIRS.intersection(rel.parts[1:-1]):
            continue
        if any(p.is_relative_to(d) for d in skip_dirs) or p.name.startswith("tokens-"):
            continue
        if from_base and p.parent == root and p.match(WEIGHTS_GLOB):
            continue
        out.append((p, str(rel)))
    if from_base:
        out.append((None, str(Path(item) / FROM_BASE)))
    return out


def collect(work, out, items=None, part_mb: float = 15.0) -> dict:
    """Writes each item of ``work`` (all but the left-behind ones, or ``items``) into
    ``out/ITEM/`` as parts plus ``ITEM.carry.json``. Returns ``{item: [part files]}``."""
    work, out = Path(work), Path(out)
    names = items or ["top"] + sorted(
        p.name for p in work.iterdir() if p.is_dir() and p.name not in LEFT_BEHIND_DIRS
    )
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for item in names:
        if item != "top" and not (work / item).is_dir():
            raise FileNotFoundError(f"{work / item}: no such item to carry")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz", preset=1) as tar:
            for path, arcname in _members(work, item):
                if path is None:  # the marker that the weights come from the base
                    data = json.dumps({"weights": "base/model"}).encode()
                    info = tarfile.TarInfo(arcname)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                else:
                    tar.add(str(path), arcname=arcname)
        folder = out / item
        if folder.exists():
            raise FileExistsError(f"{folder} exists; refusing to overwrite it.")
        folder.mkdir()
        parts = write_parts(buf.getvalue(), folder, f"{item}.tar.xz", part_mb)
        (folder / f"{item}.carry.json").write_text(json.dumps({"item": item, "parts": parts}))
        written[item] = [p["file"] for p in parts]
    return written


def restore(carried, work) -> list:
    """Extracts every item found in ``carried`` (or a folder below it) into ``work``;
    then unpacks transport packs into their model directories and gives base-derived
    directories the base's weights. A file already in ``work`` with other contents is
    an error."""
    carried, work = Path(carried), Path(work)
    specs = sorted(carried.rglob("*.carry.json"))
    if not specs:
        raise FileNotFoundError(f"{carried}: no *.carry.json (nothing carried)")
    items = []
    for spec_file in specs:
        spec = json.loads(spec_file.read_text())
        what = f"item {spec['item']!r}"
        data = read_parts(spec_file.parent, spec["parts"], spec_file, what)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:xz") as tar:
            for m in tar.getmembers():
                target = work / m.name
                if not target.resolve().is_relative_to(work.resolve()) or not m.isfile():
                    raise ValueError(f"{spec_file}: member {m.name!r} is not a plain file in WORK")
                data = tar.extractfile(m).read()
                if target.exists() and target.name == STAGE_TIMES:
                    # Each run records its own stages' times: the union is the build's.
                    merged = {**json.loads(target.read_text()), **json.loads(data)}
                    target.write_text(json.dumps(merged, indent=2))
                    continue
                if target.exists():
                    if target.read_bytes() != data:
                        raise FileExistsError(f"{target} exists with other contents; not replaced")
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        items.append(spec["item"])
    for pack in sorted(work.glob("*/transport/transport.json")):
        model = pack.parent.parent / "model"
        if not model.exists():
            unpack(pack.parent, model)
    for marker in sorted(work.glob(f"*/{FROM_BASE}")):
        base = work / json.loads(marker.read_text())["weights"]
        if not any(base.glob(WEIGHTS_GLOB)):
            raise FileNotFoundError(f"{marker}: needs {base}'s weights; carry the base item too")
        for f in base.glob(WEIGHTS_GLOB):
            if not (marker.parent / f.name).exists():
                shutil.copy(f, marker.parent / f.name)
    return items


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("collect", help="WORK -> parts, one set per item")
    a.add_argument("work")
    a.add_argument("out")
    a.add_argument("--items", default=None, help="Comma-separated items (default: all)")
    a.add_argument("--part-mb", type=float, default=15.0)
    b = sub.add_parser("restore", help="parts -> WORK")
    b.add_argument("carried")
    b.add_argument("work")
    args = p.parse_args(argv)
    if args.command == "collect":
        items = args.items.split(",") if args.items else None
        for item, parts in collect(args.work, args.out, items, args.part_mb).items():
            print(f"[INFO] {item}: {len(parts)} part(s)")
    else:
        print(f"[INFO] restored {', '.join(restore(args.carried, args.work))} into {args.work}")


if __name__ == "__main__":
    main()
