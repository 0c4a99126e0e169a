"""Speculative Streaming fine-tuning on ``transformers``' Trainer.

``python -m convert.finetune --model BASE --data train.jsonl --out OUT --mode shared``

The same recipe runs on one CPU, one GPU, or many GPUs under torchrun or
accelerate. Loss (paper Eq. 5): ``alpha_0 * CE(main -> y_t) + sum_j alpha_j *
CE(stream j -> y_{t+j})`` on completion tokens only, plus the next-token loss
of the early-exit pruning adapter at layer ``N - N_s`` (on detached states,
so it trains the adapter alone).

* ``shared`` mode: LoRA (peft, rank 32) on the base, shared by the main and
  stream rows; ``alpha_0 = 1``; the output has the LoRA merged (or, with
  ``--save-adapter``, the unmerged base plus a peft adapter in ``OUT/adapter``).
* ``lossless`` mode: the base is frozen and ``alpha_0 = 0``; optional
  stream-only LoRA (``--stream-lora-rank``) acts on stream rows alone.
  ``--self-distill`` replaces completions by the base model's own greedy ones.

Data: JSONL of ``{"prompt", "completion"}`` pairs (or ``{"text"}``), or plain
text files (``.txt``, ``.py``, ...), cut into ``--max-length`` token windows.
Output: a HF model directory with the ``"speculative_streaming"`` config
section and ``speculative_streams.safetensors``, ready for ``python -m convert``.
"""

import argparse
import json
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from mlx_specstream.config import CONFIG_KEY, SpecStreamConfig

from .msa import MultiStreamModel, causal_visibility
from .trainer_utils import add_training_args, latest_checkpoint, time_limit_callback

IGNORE = -100


# ---- data ------------------------------------------------------------------------


def read_examples(paths: List[str], tokenizer, max_length: int, window_prompt: int = 0):
    """Tokenized ``{"input_ids", "prompt_len"}`` examples from JSONL or text files
    (``text`` rows are tokenized in batches, by the fast tokenizer's threads)."""
    examples = []
    for path in map(Path, paths):
        if path.suffix != ".jsonl":
            examples += _windows(tokenizer.encode(path.read_text()), max_length, window_prompt)
            continue
        rows = [json.loads(line) for line in open(path)]
        kinds = [_kind(row) for row in rows]
        texts = [row["text"] for row, kind in zip(rows, kinds) if kind == "text"]
        encoded = iter(encode_batched(tokenizer, texts))
        for n, (row, kind) in enumerate(zip(rows, kinds), 1):
            if kind == "pair":
                p = tokenizer.encode(row["prompt"])
                c = tokenizer.encode(row["completion"]) + [tokenizer.eos_token_id]
                ids = (p + c)[:max_length]
                if len(p) >= len(ids):
                    raise ValueError(f"{path}:{n}: the prompt fills --max-length {max_length}")
                examples.append({"input_ids": ids, "prompt_len": max(len(p), 1)})
            elif kind == "ids":  # already tokenized (python -m convert.distill)
                ids = [int(t) for t in row["input_ids"]][:max_length]
                p = int(row.get("prompt_len", 1))
                if not 1 <= p < len(ids):
                    raise ValueError(f"{path}:{n}: prompt_len {p} leaves no completion")
                examples.append({"input_ids": ids, "prompt_len": p})
            elif kind == "text":
                examples += _windows(next(encoded), max_length, window_prompt)
            else:
                raise ValueError(
                    f"{path}:{n}: expected 'prompt'+'completion', 'text' or 'input_ids' keys"
                )
    return examples


def _kind(row) -> str:
    if "prompt" in row and "completion" in row:
        return "pair"
    if "input_ids" in row:
        return "ids"
    return "text" if "text" in row else "unknown"


def encode_batched(tokenizer, texts, batch: int = 256, **kwargs):
    """Each text's token ids (``tokenizer.encode``'s, or as ``kwargs`` say), computed
    ``batch`` texts at a time by the fast tokenizer's threads."""
    for i in range(0, len(texts), batch):
        yield from tokenizer(texts[i : i + batch], **kwargs)["input_ids"]


def subset(examples, n, seed: int):
    """A seeded random subset of ``n`` examples (all of them when ``n`` is None)."""
    if n is None or n >= len(examples):
        return examples
    import random

    idx = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in idx]


def _windows(ids, max_length, prompt_len):
    return [
        {"input_ids": ids[i : i + max_length], "prompt_len": max(prompt_len, 1)}
        for i in range(0, len(ids) - prompt_len - 1, max_length)
        if len(ids[i : i + max_length]) > prompt_len + 1
    ]


@torch.no_grad()
def self_distill(model, examples, eos_id, batch_size=16, desc="self-distillation", deadline=None):
    """Replaces each completion by the base model's greedy continuation of the
    same length (lossless-mode data: the streams learn what the model says).
    Examples with equal prompt and completion lengths are generated as a batch.
    Past ``deadline`` (``time.monotonic()``) no further batch starts, once one has run:
    the examples not generated are left out of the list returned."""
    import time

    from tqdm import tqdm

    model.eval()
    groups = {}
    for i, ex in enumerate(examples):
        p = ex["prompt_len"]
        groups.setdefault((p, len(ex["input_ids"]) - p), []).append(i)
    out = [None] * len(examples)
    batches = [
        (key, idx[j : j + batch_size])
        for key, idx in groups.items()
        for j in range(0, len(idx), batch_size)
    ]
    for b, ((p, n), idx) in enumerate(tqdm(batches, desc=desc)):
        if b and deadline is not None and time.monotonic() > deadline:
            break
        prompts = torch.tensor([examples[i]["input_ids"][:p] for i in idx], device=model.device)
        gen = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=eos_id,
            use_cache=True,  # (training configs may turn the KV cache off)
        )
        for row, i in zip(gen.tolist(), idx):
            out[i] = {"input_ids": row[: p + n], "prompt_len": p}
    return [ex for ex in out if ex is not None]


def collate(batch: List[Dict]):
    T = max(len(b["input_ids"]) for b in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, : len(b["input_ids"])] = torch.tensor(b["input_ids"])
    return {
        "input_ids": ids,
        "lengths": torch.tensor([len(b["input_ids"]) for b in batch]),
        "prompt_lens": torch.tensor([b["prompt_len"] for b in batch]),
    }


# ---- the loss ------------------------------------------------------------------------


def shifted_targets(input_ids, lengths, prompt_lens, shift: int):
    """Targets ``y[t + shift]`` at position ``t`` where it is a completion token in range.

    Position ``t`` is supervised from the last prompt token (``t >= p - 1``);
    ``t + shift`` must lie inside the sequence (paper: the ``T - j`` terms).
    """
    B, T = input_ids.shape
    t = torch.arange(T, device=input_ids.device)[None]
    ok = (t >= prompt_lens[:, None] - 1) & (t + shift < lengths[:, None])
    target = torch.full_like(input_ids, IGNORE)
    if shift < T:  # (a batch of sequences shorter than the shift has no targets)
        target[:, : T - shift] = input_ids[:, shift:]
    return torch.where(ok, target, torch.full_like(target, IGNORE))


class SpecStreamTrainingModel(nn.Module):
    """Wraps :class:`MultiStreamModel` with the Speculative Streaming loss for Trainer."""

    def __init__(self, msm: MultiStreamModel, main_weight: float, stream_weight: float):
        super().__init__()
        self.msm = msm
        self.main_weight = main_weight
        self.stream_weight = stream_weight

    def forward(self, input_ids, lengths, prompt_lens):
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        stream_on = pos >= (prompt_lens[:, None] - 1)
        out = self.msm(
            input_ids,
            causal_visibility(lengths, T),
            pos,
            stream_on=stream_on,
            early_exit=hasattr(self.msm.streams, "prune_adapter"),
        )
        ce = nn.functional.cross_entropy
        main_t = shifted_targets(input_ids, lengths, prompt_lens, 1)
        main_ce = ce(
            out["main_logits"].flatten(0, 1).float(), main_t.flatten(), ignore_index=IGNORE
        )
        loss = torch.zeros((), device=input_ids.device)
        if self.main_weight:
            loss = loss + self.main_weight * main_ce
        correct = {"main": _correct(out["main_logits"], main_t)}
        for j in range(self.msm.config.num_streams):
            t_j = shifted_targets(input_ids, lengths, prompt_lens, j + 2)
            logits = out["stream_logits"][:, :, j]
            if (t_j != IGNORE).any():
                loss = loss + self.stream_weight * ce(
                    logits.flatten(0, 1).float(), t_j.flatten(), ignore_index=IGNORE
                )
            correct[f"stream_{j + 1}"] = _correct(logits, t_j)
        if "early_logits" in out:
            prune_t = shifted_targets(input_ids, lengths, torch.ones_like(prompt_lens), 1)
            loss = loss + ce(
                out["early_logits"].flatten(0, 1).float(), prune_t.flatten(), ignore_index=IGNORE
            )
            correct["early_exit"] = _correct(out["early_logits"], prune_t)
        return {"loss": loss, "main_loss": main_ce.detach(), "correct": correct}


class ControlTrainingModel(nn.Module):
    """The paper's control fine-tune: the same LoRA, data and budget as a shared-mode
    run, with the next-token loss alone and no stream rows (a plain LoRA fine-tune)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, lengths, prompt_lens):
        T = input_ids.shape[1]
        mask = (torch.arange(T, device=input_ids.device)[None] < lengths[:, None]).long()
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        target = shifted_targets(input_ids, lengths, prompt_lens, 1)
        ce = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE
        )
        return {"loss": ce, "main_loss": ce.detach(), "correct": {"main": _correct(logits, target)}}


def _correct(logits, targets):
    """``(hits, count)`` of top-1 predictions on supervised positions."""
    ok = targets != IGNORE
    hits = (logits.argmax(-1) == targets) & ok
    return hits.sum().item(), ok.sum().item()


def make_trainer_class():
    from transformers import Trainer

    class SpecStreamTrainer(Trainer):
        """Trainer whose evaluation reports top-1 accuracy of the main stream and of
        each stream, and whose checkpoints are torch files (safetensors refuses the
        shared tensors of tied embeddings inside our wrapper; Trainer resumes from both)."""

        def _save(self, output_dir=None, state_dict=None):
            import os

            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            state = state_dict if state_dict is not None else self.model.state_dict()
            torch.save(state, os.path.join(output_dir, "pytorch_model.bin"))

        def create_optimizer(self, model=None):
            """Trainer's optimizer, with ``self.stream_lr = (params, lr)`` (when set)
            moved into a group of their own at that learning rate: the schedule then
            scales both groups alike. Resuming rebuilds the same groups."""
            optimizer = super().create_optimizer(model)
            params, lr = getattr(self, "stream_lr", None) or ((), None)
            ids = {id(p) for p in params}
            if ids and not any(g.get("stream_group") for g in optimizer.param_groups):
                for g in optimizer.param_groups:
                    g["params"] = [p for p in g["params"] if id(p) not in ids]
                optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
                optimizer.add_param_group(
                    {"params": list(params), "lr": lr, "weight_decay": 0.0, "stream_group": True}
                )
            return optimizer

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
            model = self.model
            model.eval()
            totals, loss_sum, main_sum, batches = {}, 0.0, 0.0, 0
            with torch.no_grad():
                for batch in self.get_eval_dataloader(dataset):
                    batch = self._prepare_inputs(batch)
                    out = model(**batch)
                    loss_sum += out["loss"].item()
                    if "main_loss" in out:  # (drafters leave the frozen base's loss out)
                        main_sum += out["main_loss"].item()
                    batches += 1
                    for k, (h, n) in out["correct"].items():
                        th, tn = totals.get(k, (0, 0))
                        totals[k] = (th + h, tn + n)
            metrics = {f"{metric_key_prefix}_loss": loss_sum / max(batches, 1)}
            if main_sum:
                # The main stream's next-token loss alone: comparable across runs and modes.
                metrics[f"{metric_key_prefix}_main_loss"] = main_sum / max(batches, 1)
            for k, (h, n) in totals.items():
                metrics[f"{metric_key_prefix}_{k}_top1"] = h / max(n, 1)
            self.log(metrics)
            model.train()
            return metrics

    return SpecStreamTrainer


# ---- saving -----------------------------------------------------------------------


def save_output(out: Path, msm: MultiStreamModel, tokenizer, save_adapter: bool):
    """HF model directory + stream tensors + config section (+ peft adapter)."""
    from safetensors.torch import save_file

    save_model(out, msm.model, tokenizer, save_adapter)
    cfg = json.loads((out / "config.json").read_text())
    cfg[CONFIG_KEY] = msm.config.to_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().float().contiguous().cpu() for k, v in msm.streams.state_dict().items()}
    save_file(state, str(out / "speculative_streams.safetensors"))


def save_model(out: Path, model, tokenizer, save_adapter: bool):
    """The (fine-tuned) base as a HF model directory: a shared-mode peft model with
    its LoRA merged, or, with ``save_adapter``, unmerged plus the adapter in
    ``OUT/adapter`` (small enough to travel; ``python -m convert --adapter-path``
    merges it)."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):  # shared-mode peft model
        if save_adapter:
            model.save_pretrained(str(out / "adapter"))
            _save_base(model.unload(), out)  # LoRA layers removed, not merged
        else:
            _save_base(model.merge_and_unload(), out)
    else:
        _save_base(model, out)
    tokenizer.save_pretrained(str(out))


def _save_base(model, out):
    model.save_pretrained(str(out), safe_serialization=True)


# ---- command line ----------------------------------------------------------------------


def setup_arg_parser():
    p = argparse.ArgumentParser(
        description="Speculative Streaming fine-tuning (transformers Trainer)."
    )
    p.add_argument("--model", required=True, help="HF model directory or hub id")
    p.add_argument("--data", nargs="+", required=True, help="JSONL or text files")
    p.add_argument("--eval-data", nargs="*", default=None, help="Held-out JSONL or text files")
    p.add_argument("--out", required=True, help="Output HF model directory (must not exist)")
    p.add_argument("--mode", choices=["shared", "lossless"], default="shared")
    p.add_argument("--num-streams", type=int, default=3)
    p.add_argument("--num-stream-layers", type=int, default=4)
    p.add_argument("--top-k", type=int, default=3, help="Draft width stored in the config")
    p.add_argument("--max-tree-nodes", type=int, default=16)
    p.add_argument("--stream-positions", choices=["same", "offset"], default="same")
    p.add_argument(
        "--lora-rank",
        type=int,
        default=32,
        help="Shared-mode LoRA rank (0: full fine-tune of nothing but streams)",
    )
    p.add_argument("--lora-alpha", type=float, default=64.0)
    p.add_argument(
        "--stream-lora-rank", type=int, default=0, help="Lossless-mode stream-only LoRA rank"
    )
    p.add_argument(
        "--stream-lora-targets",
        nargs="+",
        default=None,
        help="Linear modules of each stream layer that get the stream-only LoRA, by path in "
        "the layer (e.g. self_attn.q_proj self_attn.v_proj; default: all of them)",
    )
    p.add_argument(
        "--main-loss-weight",
        type=float,
        default=None,
        help="alpha_0 (default: 1 shared, 0 lossless)",
    )
    p.add_argument("--stream-loss-weight", type=float, default=0.1, help="alpha_j")
    p.add_argument(
        "--stream-learning-rate",
        type=float,
        default=None,
        help="Learning rate of the stream parameters (embeddings, stream LoRA, pruning adapter); "
        "default: --learning-rate. In shared mode the LoRA shared with the main stream keeps "
        "--learning-rate; the control has no stream parameters (like --stream-loss-weight, it "
        "does not apply there)",
    )
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--window-prompt", type=int, default=0, help="Prompt tokens of each text window")
    p.add_argument("--self-distill", action="store_true", help="Completions from the base model")
    p.add_argument(
        "--distill-batch-size", type=int, default=16, help="Continuations generated at once"
    )
    add_training_args(p, learning_rate=5e-4, num_train_epochs=5.0, save_steps=200)
    p.add_argument(
        "--save-adapter", action="store_true", help="Keep the shared-mode LoRA as a peft adapter"
    )
    p.add_argument(
        "--control",
        action="store_true",
        help="Shared mode's control: the same LoRA fine-tune without stream rows or their losses",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def build(args, model, tokenizer):
    """The stream model, with LoRA and frozen parameters set for the mode."""
    spec = SpecStreamConfig(
        num_streams=args.num_streams,
        num_stream_layers=args.num_stream_layers,
        top_k=args.top_k,
        max_tree_nodes=args.max_tree_nodes,
        mode=args.mode,
        stream_positions=args.stream_positions,
        stream_lora_rank=args.stream_lora_rank if args.mode == "lossless" else 0,
        stream_lora_targets=args.stream_lora_targets,
    )
    for p in model.parameters():
        p.requires_grad_(False)
    if args.mode == "shared" and args.lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=args.lora_alpha,
                target_modules="all-linear",
                lora_dropout=0.0,
            ),
        )
    torch.manual_seed(args.seed)
    return MultiStreamModel(model, spec)


def train_and_evaluate(wrapped, args, out: Path, train, held_out, stream_lr=None):
    """Trains ``wrapped`` with transformers' Trainer, resuming from the newest
    checkpoint in ``out/checkpoints``, then evaluates on ``held_out``. Shared by
    the stream fine-tune and ``convert.train_drafter`` (same flags).
    ``stream_lr``: ``(params, lr)``, parameters trained at their own learning rate."""
    from transformers import TrainingArguments

    training_args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        logging_steps=max(1, min(50, args.eval_steps // 2)),
        eval_strategy="steps" if held_out else "no",
        eval_steps=args.eval_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        bf16=args.bf16,
        seed=args.seed,
        report_to=[],
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
    )
    limit = getattr(args, "time_limit", None)
    callbacks = [time_limit_callback(limit)] if limit else []
    trainer = make_trainer_class()(
        model=wrapped,
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=collate,
        callbacks=callbacks,
    )
    trainer.stream_lr = stream_lr
    trainer.train(resume_from_checkpoint=latest_checkpoint(out / "checkpoints"))
    if held_out:
        metrics = trainer.evaluate()
        print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
        trainer.final_metrics = metrics
    else:
        trainer.final_metrics = {}
    trainer.final_metrics.update(
        steps=trainer.state.global_step,
        max_steps=args.max_steps,
        stopped_at_time_limit=bool(callbacks and callbacks[0].reached),
    )
    return trainer


def main(argv=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    args = setup_arg_parser().parse_args(argv)
    if args.control and (args.mode != "shared" or args.lora_rank <= 0):
        raise ValueError(
            "--control is the control of a shared-mode LoRA fine-tune: it needs "
            f"--mode shared and --lora-rank > 0 (got {args.mode}, {args.lora_rank})."
        )
    out = Path(args.out)
    if out.exists() and any(p.name != "checkpoints" for p in out.iterdir()):
        raise FileExistsError(f"{out} already holds a model; refusing to overwrite it.")
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    train = read_examples(args.data, tokenizer, args.max_length, args.window_prompt)
    train = subset(train, args.max_examples, args.seed)
    held_out = (
        read_examples(args.eval_data, tokenizer, args.max_length, args.window_prompt)
        if args.eval_data
        else None
    )
    if args.self_distill:
        if torch.cuda.is_available():
            model.cuda()  # generate where the Trainer will train (it keeps the model there)
        bs = args.distill_batch_size
        train = self_distill(model, train, tokenizer.eos_token_id, bs)
        if held_out:
            held_out = self_distill(
                model, held_out, tokenizer.eos_token_id, bs, desc="self-distillation (eval)"
            )
    msm = build(args, model, tokenizer)
    if args.control:
        wrapped = ControlTrainingModel(msm.model)
    else:
        main_weight = args.main_loss_weight
        if main_weight is None:
            main_weight = 1.0 if args.mode == "shared" else 0.0
        wrapped = SpecStreamTrainingModel(msm, main_weight, args.stream_loss_weight)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    print(f"[INFO] {len(train)} training examples; {trainable:,} trainable parameters")
    stream_lr = None
    if args.stream_learning_rate is not None and not args.control:
        stream_lr = (list(msm.streams.parameters()), args.stream_learning_rate)
    trainer = train_and_evaluate(wrapped, args, out, train, held_out, stream_lr)
    if trainer.is_world_process_zero():
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(trainer.final_metrics, indent=2))
        if args.control:
            save_model(out, msm.model, tokenizer, args.save_adapter)
        else:
            save_output(out, msm, tokenizer, args.save_adapter)
        print(f"[INFO] wrote {out}")


if __name__ == "__main__":
    main()
