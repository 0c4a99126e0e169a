"""Pretrains a small Llama-architecture causal LM from scratch on a JSONL corpus.

Run as ``python -m convert.pretrain --corpus runs/default/corpus --tokenizer
runs/default/tokenizer --out runs/default/base``. Built on ``transformers``'
Trainer: it resumes from the newest checkpoint in ``--out``, and runs on CPU,
one GPU, or several under torchrun/accelerate (``--bf16`` on a GPU). The corpus
is tokenized once, in batches (the fast tokenizer's threads), and cached as
``OUT/tokens-{train,eval}.npy``. Writes the model (``save_pretrained``,
safetensors), the tokenizer, ``metrics.json`` (parameters, tokens trained,
held-out loss), ``loss.csv`` and ``loss.png``.
"""

import argparse
import json
import math
from pathlib import Path

from .trainer_utils import latest_checkpoint, time_limit_callback

DEFAULT_ARCH = dict(
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=704,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def tokenize_corpus(jsonl: Path, tokenizer, cache: Path = None, batch: int = 256):
    """Every document's tokens followed by EOS, concatenated (``int32``); read from
    ``cache`` when it exists, else computed in batches and saved there."""
    import numpy as np

    if cache is not None and cache.exists():
        return np.load(cache)
    from .finetune import encode_batched

    texts = [json.loads(line)["text"] for line in open(jsonl)]
    # Source text that spells "</s>" is text, not an end of document.
    encoded = encode_batched(
        tokenizer, texts, batch, add_special_tokens=False, split_special_tokens=True
    )
    parts = [np.asarray(ids + [tokenizer.eos_token_id], dtype=np.int32) for ids in encoded]
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache.with_suffix(".tmp.npy"), ids)
        cache.with_suffix(".tmp.npy").rename(cache)  # atomic: never a half-written cache
    return ids


def pack_corpus(jsonl: Path, tokenizer, seq_len: int, cache: Path = None, max_rows: int = None):
    """All documents, each followed by EOS, cut into ``seq_len``-token rows (at most
    ``max_rows`` of them, evenly spaced over the corpus)."""
    import torch

    ids = tokenize_corpus(jsonl, tokenizer, cache)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{jsonl}: {len(ids)} tokens, fewer than one row of --seq-len {seq_len}")
    rows = torch.from_numpy(ids[: n * seq_len].astype("int64")).view(n, seq_len)
    if max_rows is not None and n > max_rows:
        rows = rows[torch.linspace(0, n - 1, max_rows).long()]
    return rows


class Rows:
    """A map-style dataset over packed rows (labels are the inputs; HF shifts them)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def plot_loss(log_history, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    with open(out_dir / "loss.csv", "w") as f:
        f.write("step,split,loss\n")
        for split, rows in (("train", train), ("eval", evals)):
            for step, loss in rows:
                f.write(f"{step},{split},{loss:.5f}\n")
    plt.figure(figsize=(6, 4))
    plt.plot(*zip(*train), label="train")
    if evals:
        plt.plot(*zip(*evals), "o-", label="held-out modules")
    plt.xlabel("step")
    plt.ylabel("cross-entropy (nats/token)")
    plt.title("Base model pretraining")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.tight_layout()
    plt.savefig(out_dir / "loss.png", dpi=120)


def main():
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainingArguments,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="runs/default/corpus")
    parser.add_argument("--tokenizer", default="runs/default/tokenizer")
    parser.add_argument("--out", default="runs/default/base")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--eval-steps", type=int, default=250)
    parser.add_argument("--save-steps", type=int, default=250)
    parser.add_argument(
        "--eval-rows", type=int, default=None, help="Held-out rows evaluated (default: all)"
    )
    parser.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPU)")
    parser.add_argument(
        "--time-limit", type=float, default=None, help="Minutes of training before it stops"
    )
    parser.add_argument(
        "--arch", type=json.loads, default={}, help="JSON overrides of the architecture"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**DEFAULT_ARCH, **args.arch},
    )
    model = LlamaForCausalLM(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    corpus = Path(args.corpus)
    train = Rows(
        pack_corpus(corpus / "train.jsonl", tokenizer, args.seq_len, out / "tokens-train.npy")
    )
    held_out = Rows(
        pack_corpus(
            corpus / "eval.jsonl", tokenizer, args.seq_len, out / "tokens-eval.npy", args.eval_rows
        )
    )
    print(f"train rows: {len(train)} x {args.seq_len}; eval rows: {len(held_out)}")
    training_args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        weight_decay=0.1,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=20,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        bf16=args.bf16,
        save_total_limit=2,
        seed=args.seed,
        report_to=[],
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    callbacks = [time_limit_callback(args.time_limit)] if args.time_limit else []
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=latest_checkpoint(out / "checkpoints"))
    metrics = trainer.evaluate()
    print(
        f"held-out loss {metrics['eval_loss']:.4f} (perplexity {math.exp(metrics['eval_loss']):.2f})"
    )
    if not trainer.is_world_process_zero():
        return
    record = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": trainer.state.global_step * args.batch_size
        * args.gradient_accumulation_steps * training_args.world_size * args.seq_len,
        "corpus_tokens": int(train.rows.numel()),
        "eval_loss": metrics["eval_loss"],
        "eval_tokens": int(held_out.rows.numel()),
        "bf16": args.bf16,
        "steps": trainer.state.global_step,
        "max_steps": args.max_steps,
        "stopped_at_time_limit": bool(callbacks and callbacks[0].reached),
        "train_runtime_s": round(sum(h.get("train_runtime", 0) for h in trainer.state.log_history), 1),
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    # The model directory last: the build takes it as the sign that this stage is done.
    model.save_pretrained(str(out / "model"), safe_serialization=True)
    tokenizer.save_pretrained(str(out / "model"))
    plot_loss(trainer.state.log_history, out)


if __name__ == "__main__":
    main()
