"""Self-distilled training data: the base model's own greedy continuations.

``python -m convert.distill --model BASE --data train.jsonl --out distilled.jsonl``

Each example keeps its first ``--window-prompt`` tokens and replaces the rest
by the base's greedy continuation of the same length, written as
``{"input_ids", "prompt_len"}`` rows that ``convert.finetune`` and
``convert.train_drafter`` read. One file serves every drafter trained on the
same base, so they see the same data.
"""

import argparse
import json
from pathlib import Path

from .finetune import read_examples, self_distill, subset


def main(argv=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF model directory or hub id")
    p.add_argument("--data", nargs="+", required=True, help="JSONL or text files")
    p.add_argument("--out", required=True, help="Output JSONL (must not exist)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--window-prompt", type=int, default=32)
    p.add_argument("--max-examples", type=int, default=None, help="A seeded random subset")
    p.add_argument("--batch-size", type=int, default=16, help="Continuations generated at once")
    p.add_argument("--bf16", action="store_true", help="Generate in bfloat16 (GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; refusing to overwrite it.")
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if args.bf16 else torch.float32
    )
    if torch.cuda.is_available():
        model = model.cuda()
    examples = read_examples(args.data, tokenizer, args.max_length, args.window_prompt)
    examples = subset(examples, args.max_examples, args.seed)
    examples = self_distill(model, examples, tokenizer.eos_token_id, batch_size=args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with open(tmp, "w") as f:
        for ex in examples:
            f.write(json.dumps(ex) + "\n")
    tmp.rename(out)
    print(f"[INFO] wrote {len(examples)} examples to {out}")


if __name__ == "__main__":
    main()
