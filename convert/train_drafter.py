"""Trains a Medusa-1 or ParallelSpec drafter on a frozen base (transformers Trainer).

``python -m convert.train_drafter --kind parallelspec --model BASE --data distilled.jsonl --out OUT``

Runs on one CPU, one GPU, or many under torchrun or accelerate. The base stays
frozen; the loss is in :class:`convert.drafters.DrafterTrainingModel`. Train on
self-distilled data (``python -m convert.distill``), as both papers do.
Output: the base model directory unchanged, plus ``drafter.safetensors`` and
the ``"drafter"`` config section, ready for ``python -m convert``.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch

from mlx_specstream.config import DRAFTER_FILE, DRAFTER_KEY, DrafterConfig

from .drafters import DrafterTrainingModel
from .finetune import read_examples, subset, train_and_evaluate
from .trainer_utils import add_training_args


def setup_arg_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=["medusa", "parallelspec"], required=True)
    p.add_argument("--model", required=True, help="HF model directory or hub id (the frozen base)")
    p.add_argument("--data", nargs="+", required=True, help="JSONL or text files")
    p.add_argument("--eval-data", nargs="*", default=None, help="Held-out JSONL or text files")
    p.add_argument("--out", required=True, help="Output HF model directory (must not exist)")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="Draft levels k")
    p.add_argument(
        "--medusa-lm-heads",
        choices=["shared", "own", "base"],
        default="shared",
        help="Medusa: 'shared' (one block per head over the state before the final norm, "
        "then the base's norm and head), or the released checkpoints' layout over the normed "
        "state: 'own' (an LM head of its own per head, Medusa-1's recipe) or 'base' (the "
        "base's head)",
    )
    p.add_argument(
        "--medusa-num-layers",
        type=int,
        default=1,
        help="Medusa with --medusa-lm-heads own or base: residual blocks per head",
    )
    p.add_argument("--top-k", type=int, default=3, help="Draft width stored in the config")
    p.add_argument("--max-tree-nodes", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--window-prompt", type=int, default=0, help="Prompt tokens of each text window")
    add_training_args(p, learning_rate=1e-3, num_train_epochs=1.0, save_steps=100)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    args = setup_arg_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(p.name != "checkpoints" for p in out.iterdir()):
        raise FileExistsError(f"{out} already holds a model; refusing to overwrite it.")
    set_seed(args.seed)
    spec = DrafterConfig(
        kind=args.kind,
        num_draft_tokens=args.num_draft_tokens,
        top_k=args.top_k,
        max_tree_nodes=args.max_tree_nodes,
        medusa=medusa_layout(args),
    )
    if spec.kind == "parallelspec" and spec.num_draft_tokens < 2:
        raise ValueError("--num-draft-tokens must be >= 2 for parallelspec (1 real row + masks).")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.requires_grad_(False)
    train = read_examples(args.data, tokenizer, args.max_length, args.window_prompt)
    train = subset(train, args.max_examples, args.seed)
    held_out = (
        read_examples(args.eval_data, tokenizer, args.max_length, args.window_prompt)
        if args.eval_data
        else None
    )
    wrapped = DrafterTrainingModel(model, spec)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    print(f"[INFO] {len(train)} training examples; {trainable:,} trainable parameters")
    trainer = train_and_evaluate(wrapped, args, out, train, held_out)
    if trainer.is_world_process_zero():
        save_output(out, wrapped, tokenizer, Path(args.model))
        (out / "metrics.json").write_text(json.dumps(trainer.final_metrics, indent=2))
        print(f"[INFO] wrote {out}")


def medusa_layout(args):
    """The drafter section's ``medusa`` dict for ``--medusa-lm-heads own`` or ``base``
    (the released layout), else ``None``.

    Raises:
        ValueError: Medusa flags given for ParallelSpec, or blocks per head below 1 or
          above 1 for the heads trained here.
    """
    released = args.medusa_lm_heads != "shared"
    if args.kind != "medusa" and (released or args.medusa_num_layers != 1):
        raise ValueError("--medusa-lm-heads and --medusa-num-layers are for --kind medusa")
    if args.medusa_num_layers < 1 or (not released and args.medusa_num_layers != 1):
        raise ValueError(
            f"--medusa-num-layers {args.medusa_num_layers}: at least 1, and above 1 only with "
            "--medusa-lm-heads own or base"
        )
    if not released:
        return None
    return dict(layers_per_head=args.medusa_num_layers, fc_bias=True, token_map_size=None,
                lm_heads=args.num_draft_tokens if args.medusa_lm_heads == "own" else 0)  # fmt: skip


def save_output(out: Path, wrapped: DrafterTrainingModel, tokenizer, base_dir: Path = None):
    """The base model directory unchanged, plus the drafter tensors and config section."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    wrapped.model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if base_dir is not None and (base_dir / "generation_config.json").exists():
        shutil.copy(base_dir / "generation_config.json", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg[DRAFTER_KEY] = wrapped.config.to_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(wrapped.drafter_state(), str(out / DRAFTER_FILE))


if __name__ == "__main__":
    main()
