"""Training data for ``python -m mlx_specstream.train``.

Reads what ``mlx_lm.lora`` reads, plus plain text or code:

* a JSONL file whose rows hold ``text``, ``prompt`` and ``completion``, or
  ``messages`` (a chat);
* a directory in ``mlx_lm.lora``'s layout: ``train.jsonl`` and optionally
  ``valid.jsonl`` (the held-out set);
* any other directory: every ``.jsonl`` file in it as JSONL, every other
  UTF-8 file (code, text) as text.

Every example is ``{"input_ids": [...], "prompt_len": p}``: the streams are
trained on the positions from the last prompt token on (the tokens after the
prompt are the completion), exactly as ``convert.finetune`` trains them.

* ``text`` (a row's text, or a file) is cut into windows of
  ``max_seq_length`` tokens whose first ``window_prompt`` tokens are the prompt,
  as ``convert.finetune`` cuts it;
* ``prompt``/``completion`` and ``messages`` go through the tokenizer's chat
  template as in ``mlx_lm.lora`` (``--mask-prompt``: the prompt is everything
  before the last message). A tokenizer without a chat template (a base
  model) gets ``prompt + completion + EOS`` instead, as ``convert.finetune``
  builds it; ``messages`` then cannot be read and is refused.

Self-distillation (:func:`self_distill`) replaces each completion by the base
model's own greedy continuation, generated in batches with mlx-lm's
``BatchGenerator``: a text window's continuation has the window's length (EOS
suppressed, as in ``convert.finetune``); a prompt's stops at EOS.
"""

import json
import random
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

Example = Dict[str, object]

KEYS_HINT = "expected 'text', 'prompt' and 'completion', or 'messages'"


class DataError(ValueError):
    """Training data that cannot be used; the message names the file (and line)."""


def window_length_needed(window_prompt: int) -> int:
    """Tokens a text needs for one window: the prompt plus two, so that stream 1
    (which predicts the token two places after its position) has a target."""
    return max(window_prompt, 1) + 2


def text_windows(ids: Sequence[int], max_seq_length: int, window_prompt: int) -> List[Example]:
    """Cuts token ids into windows as ``convert.finetune`` does: one every
    ``max_seq_length`` tokens, each with ``window_prompt`` prompt tokens (at
    least 1), dropping a tail too short to supervise any stream."""
    p = max(window_prompt, 1)
    out = []
    for i in range(0, len(ids) - p - 1, max_seq_length):
        window = list(ids[i : i + max_seq_length])
        if len(window) > p + 1:
            out.append({"input_ids": window, "prompt_len": p, "kind": "text"})
    return out


def _chat_example(tokenizer, messages, tools=None) -> Tuple[List[int], int]:
    """Tokens and prompt length of a chat, as ``mlx_lm.lora --mask-prompt``
    computes them (mlx-lm's ``ChatDataset``)."""
    from mlx_lm.tuner.datasets import ChatDataset

    row = {"messages": messages}
    if tools is not None:
        row["tools"] = tools
    tokens, offset = ChatDataset([row], tokenizer, mask_prompt=True).process(row)
    return list(tokens), int(offset)


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def row_example(row: dict, tokenizer, where: str, max_seq_length: int, window_prompt: int):
    """The examples of one JSONL row (a text gives several windows, or none).

    Raises:
        DataError: naming ``where`` (``file:line``) and the offending key.
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object; {KEYS_HINT}.")
    if "prompt" in row and "completion" in row:
        for key in ("prompt", "completion"):
            if not isinstance(row[key], str):
                raise DataError(
                    f"{where}: '{key}' must be a string, not {type(row[key]).__name__}."
                )
        if _has_chat_template(tokenizer):
            messages = [
                {"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]},
            ]
            ids, p = _chat_example(tokenizer, messages, row.get("tools"))
        else:
            prompt = tokenizer.encode(row["prompt"])
            ids = prompt + tokenizer.encode(row["completion"]) + [tokenizer.eos_token_id]
            p = len(prompt)
        return [_completion(ids, p, where, max_seq_length)]
    if "messages" in row:
        if not _has_chat_template(tokenizer):
            raise DataError(
                f"{where}: 'messages' needs a chat template, and the tokenizer has none; "
                "use 'text' or 'prompt'/'completion' rows for a base model."
            )
        if not isinstance(row["messages"], list) or not row["messages"]:
            raise DataError(f"{where}: 'messages' must be a non-empty list of messages.")
        ids, p = _chat_example(tokenizer, row["messages"], row.get("tools"))
        return [_completion(ids, p, where, max_seq_length)]
    if "text" in row:
        if not isinstance(row["text"], str):
            raise DataError(f"{where}: 'text' must be a string, not {type(row['text']).__name__}.")
        return text_windows(tokenizer.encode(row["text"]), max_seq_length, window_prompt)
    raise DataError(f"{where}: {KEYS_HINT} keys; the row has {sorted(row)}.")


def _completion(ids: List[int], prompt_len: int, where: str, max_seq_length: int) -> Example:
    p = max(prompt_len, 1)
    ids = ids[:max_seq_length]
    if p + 2 > len(ids):
        raise DataError(
            f"{where}: the prompt ({prompt_len} tokens) leaves fewer than 2 completion tokens "
            f"within --max-seq-length {max_seq_length}; stream 1 needs at least 2."
        )
    return {"input_ids": ids, "prompt_len": p, "kind": "completion"}


def read_jsonl(path: Path, tokenizer, max_seq_length: int, window_prompt: int) -> List[Example]:
    """The examples of a JSONL file (blank lines are skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e}).") from e
            out += row_example(row, tokenizer, f"{path}:{n}", max_seq_length, window_prompt)
    return out


def read_text(path: Path) -> Optional[str]:
    """The file's text, or None when it is not UTF-8 text (a binary file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def _files_under(directory: Path) -> List[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def read_source(path: Path, tokenizer, max_seq_length: int, window_prompt: int):
    """Examples of one ``--data`` path, and a held-out set when the path is a
    directory in ``mlx_lm.lora``'s layout with a ``valid.jsonl``.

    Returns:
        tuple: ``(train, valid, skipped)``: lists of examples, and the texts
        too short for one window (``(name, tokens)`` pairs).
    """
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist.")
    args = (tokenizer, max_seq_length, window_prompt)
    if path.is_file():
        files, valid = [path], []
    elif (path / "train.jsonl").exists():
        files = [path / "train.jsonl"]
        valid = read_jsonl(path / "valid.jsonl", *args) if (path / "valid.jsonl").exists() else []
    else:
        files, valid = _files_under(path), []
        if not files:
            raise DataError(f"--data {path} is an empty directory: no text, code or JSONL files.")
    train, skipped = [], []
    for f in files:
        if f.suffix == ".jsonl":
            train += read_jsonl(f, *args)
            continue
        text = read_text(f)
        if text is None:
            continue
        ids = tokenizer.encode(text)
        windows = text_windows(ids, max_seq_length, window_prompt)
        if not windows:
            skipped.append((str(f), len(ids)))
        train += windows
    return train, valid, skipped


def load_examples(paths: Sequence[str], tokenizer, max_seq_length: int, window_prompt: int):
    """Training and held-out examples from ``--data`` paths.

    Raises:
        FileNotFoundError: a path does not exist.
        DataError: no usable example at all (the message names the files and
          says why: empty, or every text shorter than one window), or a bad row.
    """
    if window_prompt < 0 or window_length_needed(window_prompt) > max_seq_length:
        raise DataError(
            f"--window-prompt {window_prompt} does not fit --max-seq-length {max_seq_length}: "
            f"a window needs the prompt plus 2 tokens ({window_length_needed(window_prompt)})."
        )
    train, valid, skipped = [], [], []
    for path in map(Path, paths):
        t, v, s = read_source(path, tokenizer, max_seq_length, window_prompt)
        train, valid, skipped = train + t, valid + v, skipped + s
    if not train:
        names = ", ".join(str(p) for p in paths)
        if skipped:
            shortest = ", ".join(f"{name} ({n} tokens)" for name, n in skipped[:5])
            raise DataError(
                f"--data {names}: every text is too short for one window: {shortest}; "
                f"--window-prompt {window_prompt} needs at least "
                f"{window_length_needed(window_prompt)} tokens."
            )
        raise DataError(f"--data {names} holds no training examples.")
    return train, valid, skipped


def subset(examples: List[Example], n: Optional[int], seed: int) -> List[Example]:
    """A seeded random subset of ``n`` examples, the same one ``convert.finetune
    --max-examples`` takes from the same list (all of them when ``n`` is None)."""
    if n is None or n >= len(examples):
        return examples
    idx = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in idx]


# ---- self-distillation -------------------------------------------------------------------


def _suppress(token_ids: Sequence[int]):
    """An mlx-lm logits processor that forbids ``token_ids``."""
    banned = mx.array(list(token_ids), dtype=mx.int32)

    def processor(tokens, logits):
        return logits.at[..., banned].add(-mx.inf)

    return processor


def generate_greedy(model, prompts, max_tokens, logits_processors=(), batch_size=32):
    """Greedy continuations of ``prompts`` with mlx-lm's ``BatchGenerator``,
    ``max_tokens[i]`` tokens each: nothing stops them early (the caller cuts
    at EOS where it wants to)."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        logits_processors=list(logits_processors),
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    try:
        uids = gen.insert([list(p) for p in prompts], list(max_tokens))
        out = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(int(r.token))
    finally:
        gen.close()
    return [out[uid] for uid in uids]


def self_distill(
    model, tokenizer, examples: List[Example], batch_size: int = 32, desc="self-distillation"
):
    """Replaces each completion by the base model's greedy continuation.

    Generates ``batch_size`` prompts at a time with mlx-lm's batched
    generation. A text window's continuation has exactly the window's
    completion length (EOS is suppressed, as ``convert.finetune`` does with
    ``min_new_tokens``); a prompt's continuation (at most the original
    completion's length) ends at the first EOS, included.

    Args:
        model: the base model (with streams attached or not: outside a
          multi-stream pass the hooks are inactive).
        tokenizer: its mlx-lm tokenizer.
        examples: ``{"input_ids", "prompt_len", "kind"}`` examples.
        batch_size (int): prompts per generation batch.
        desc (str): the progress bar's label.

    Returns:
        list: new examples, in the same order.
    """
    from tqdm import tqdm

    eos = set(tokenizer.eos_token_ids) | {tokenizer.eos_token_id}
    eos.discard(None)
    out = [None] * len(examples)
    chunks = [
        (exact, idx[j : j + batch_size])
        for exact in (True, False)
        for idx in [[i for i, ex in enumerate(examples) if (ex["kind"] == "text") == exact]]
        for j in range(0, len(idx), batch_size)
    ]
    for exact, chunk in tqdm(chunks, desc=desc):
        prompts = [examples[i]["input_ids"][: examples[i]["prompt_len"]] for i in chunk]
        lengths = [len(examples[i]["input_ids"]) - examples[i]["prompt_len"] for i in chunk]
        processors = [_suppress(sorted(eos))] if exact and eos else []
        for i, prompt, gen in zip(
            chunk, prompts, generate_greedy(model, prompts, lengths, processors, batch_size)
        ):
            if not exact:
                ends = [k for k, t in enumerate(gen) if t in eos]
                gen = gen[: ends[0] + 1] if ends else gen
            out[i] = dict(examples[i], input_ids=list(prompt) + gen)
    return out
