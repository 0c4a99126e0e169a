"""What a recipe's shipped models take in the tracked tree, against the 30 MB it may hold.

    python benchmarks/package_budget.py --tokenizer /tmp/tok16k --tag s60

The models ship inside the package, so they count against the tracked tree, which
travels to the GPU machine with every run (at most 30 MB, beside a part of MLX). For
each choice of bits for the base and the draft model this counts what a recipe ships
(``convert.package_size``: every tensor, from the recipe's architectures, with a measured
tokenizer's files) and sets it beside what the rest of the tracked tree takes now
(``git ls-files`` outside ``mlx_specstream/models``).
"""

import argparse
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from convert.package_size import TREE_MB, flag, llama, model_bytes, stream_bytes  # noqa: E402
from convert.recipes import RECIPES  # noqa: E402

MODELS = "mlx_specstream/models"


def tracked_outside_models() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    names = [n for n in files.stdout.decode().split("\0") if n and not n.startswith(MODELS)]
    return sum((ROOT / n).stat().st_size for n in names if (ROOT / n).is_file())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="code")
    p.add_argument("--tokenizer", required=True,
                   help="a tokenizer directory of the recipe's size (convert.tokenizer's output)")  # fmt: skip
    p.add_argument("--tag", default=None)
    args = p.parse_args()
    r = RECIPES[args.recipe]
    vocab = int(flag(r.tokenizer, "--vocab-size"))
    tok_dir = Path(args.tokenizer)
    tok = sum((tok_dir / f).stat().st_size for f in ("tokenizer.json", "tokenizer_config.json"))
    base, draft = llama(r.base, vocab), llama(r.draft, vocab)
    streams = stream_bytes(r, base)
    rest = tracked_outside_models()
    mb = 1e6
    rows = []
    for base_bits in (None, 8, 4, 3):
        for draft_bits in ("none", None, 4):
            size = model_bytes(base, base_bits) + streams + tok
            if draft_bits != "none":
                size += model_bytes(draft, draft_bits) + tok
            rows.append((base_bits, draft_bits, size))
    n_base = sum(p.numel() for p in base.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    head = [
        f"# What the `{r.name}` recipe ships, against the {TREE_MB:.0f} MB tracked tree",
        "",
        f"`python benchmarks/package_budget.py --recipe {r.name} --tokenizer TOK"
        + (f" --tag {args.tag}`" if args.tag else "`"),
        f"({platform.platform()}; tokenizer: {vocab} pieces, {tok / mb:.2f} MB a copy)",
        "",
        f"- base: {n_base:,} parameters; draft model: {n_draft:,}; lossless streams "
        f"(float32): {streams / mb:.2f} MB",
        f"- the tracked tree outside `{MODELS}` now: {rest / mb:.2f} MB, so the models may "
        f"take {(TREE_MB * mb - rest) / mb:.2f} MB",
        "",
        "| base | draft model | models (MB) | tracked tree (MB) | fits |",
        "|---|---|---|---|---|",
    ]
    name = {None: "bfloat16", 8: "8-bit", 4: "4-bit", 3: "3-bit", "none": "not shipped"}
    lines = [
        f"| {name[b]} | {name[d]} | {s / mb:.2f} | {(s + rest) / mb:.2f} | "
        f"{'yes' if s + rest <= TREE_MB * mb else 'no'} |"
        for b, d, s in rows
    ]
    text = "\n".join(head + lines) + "\n"
    print(text)
    if args.tag:
        out = ROOT / "benchmarks" / "results" / f"package_budget-{args.tag}.md"
        out.write_text(text)
        print(f"[INFO] wrote {out}")


if __name__ == "__main__":
    main()
