"""The flags that several commands share (generate, chat, server), with mlx-lm's
names and defaults, and loading a model as those flags say."""

import argparse
import sys
from typing import Any, Dict, Optional

from .decode import DRAFTS
from .draft_schedule import SCHEDULES

DEFAULT_PREFILL_STEP_SIZE = 2048
DEFAULT_XTC_PROBABILITY = 0.0
DEFAULT_XTC_THRESHOLD = 0.1


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--adapter-path``, ``--drafter``, ``--num-mtp-layers``,
    ``--draft-vocab`` and ``--trust-remote-code``."""
    parser.add_argument(
        "--model",
        type=str,
        default=None,
        help="Local model directory or Hugging Face repo. Default: the embedded model.",
    )
    parser.add_argument(
        "--adapter-path",
        default=None,
        help="Optional path for the trained adapter weights and config (mlx_lm.lora's), "
        "applied to the base model",
    )
    parser.add_argument(
        "--drafter",
        default=None,
        help="Model directory whose drafter (streams, Medusa heads, ParallelSpec) replaces the "
        "model's own; it must have been trained on the same base. Also a checkpoint's MTP "
        "layers, or an EAGLE-3, EAGLE-1, DFlash or released Medusa drafter's checkpoint. Default: "
        "the model's own.",
    )
    add_num_mtp_layers_arg(parser)
    add_draft_vocab_arg(parser)
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="Enable trusting remote code for tokenizer"
    )


def add_num_mtp_layers_arg(parser: argparse.ArgumentParser) -> None:
    """``--num-mtp-layers``: how many of a checkpoint's MTP layers draft."""
    parser.add_argument(
        "--num-mtp-layers",
        type=int,
        default=None,
        help="Where the drafter is a checkpoint's MTP layers, how many of them draft (the "
        "first ones). Default: every layer it has (at most 3), or the model's tuned count.",
    )


def add_draft_vocab_arg(parser: argparse.ArgumentParser) -> None:
    """``--draft-vocab FILE|none``: the tokens a drafter's head ranks."""
    parser.add_argument(
        "--draft-vocab",
        type=draft_vocab_value,
        default=None,
        help="A draft vocabulary (python -m mlx_specstream.draft_vocab): the drafter ranks "
        "only its tokens, which costs less on a large vocabulary and stays lossless; 'none': "
        "every token. Default: the drafter directory's draft_vocab.safetensors, if any.",
    )


def draft_vocab_value(value: str):
    """``--draft-vocab``'s value as :func:`mlx_specstream.load` takes it."""
    return False if value.lower() == "none" else value


def add_draft_args(parser: argparse.ArgumentParser, per_request: bool = False) -> None:
    """``--draft``, ``--draft-model``, ``--num-draft-tokens``, ``--ngram-candidates``,
    ``--draft-confidence``, ``--draft-schedule`` and ``--no-speculation``; for one
    generation (not a server's requests) also ``--tree-top-k``, ``--tree-depth``,
    ``--max-tree-nodes`` and ``--dynamic-tree``."""
    scope = "Default of a request's 'draft' field: " if per_request else ""
    parser.add_argument(
        "--draft",
        choices=DRAFTS,
        default=None,
        help=f"{scope}'streams' (the model's own), 'ngram' (prompt lookup, any model) or "
        "'streams+ngram' (merged into one tree). Default: the one the model's config names "
        "(for this device, chosen by mlx_specstream.tune), else 'streams'.",
    )
    parser.add_argument(
        "--draft-model",
        type=str,
        default=None,
        help="A small model with the same tokenizer that drafts instead (mlx-lm's draft-model "
        "decoding, verified as a tree here); with --draft ngram, prompt lookup is merged in"
        + ("; a request's 'draft' field then cannot name another source" if per_request else ""),
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=int,
        default=None,
        help="Longest prompt-lookup draft (default: 10, as transformers' "
        "prompt_lookup_num_tokens), or with --draft-model the drafts per step (default: 3, "
        "as mlx_lm.generate)"
        + ("; a request's 'num_draft_tokens' overrides it" if per_request else ""),
    )
    parser.add_argument(
        "--ngram-candidates",
        type=int,
        default=None,
        help="Prompt-lookup drafts merged into each tree: the latest distinct continuations "
        "of the text's last tokens (default: 1, a chain)"
        + ("; a request's 'ngram_candidates' overrides it" if per_request else ""),
    )
    parser.add_argument(
        "--draft-confidence",
        type=float,
        default=None,
        help="Stop each chain after a draft its drafter (the draft model, or the model's "
        "streams or drafter) gives less than this probability (transformers' "
        "assistant_confidence_threshold); the chain's length (--num-draft-tokens with a draft "
        "model, else --tree-depth) is then its longest; 0: off. Default: the model's tuned one, "
        "else off"
        + ("; a request's 'draft_confidence' overrides it (such requests are decoded one at a "
           "time)" if per_request else ""),
    )  # fmt: skip
    parser.add_argument(
        "--draft-schedule",
        choices=SCHEDULES,
        default=None,
        help="How long the --draft-model's chains are: 'constant', --num-draft-tokens each "
        "(as mlx-lm), or 'heuristic', transformers' num_assistant_tokens_schedule: 2 longer "
        "after a step that accepted every draft, 1 shorter after one that did not, from 1 up "
        "to --num-draft-tokens (give it a longer cap than a fixed chain's, e.g. 8). Default: "
        "constant"
        + ("; a request's 'draft_schedule' overrides it (such requests are decoded one at a "
           "time)" if per_request else ""),
    )  # fmt: skip
    parser.add_argument(
        "--no-speculation",
        action="store_true",
        help=(
            "Default of a request's 'speculative' field: false, one token per forward pass"
            if per_request
            else "Decode one token per forward pass"
        ),
    )
    if per_request:
        return
    parser.add_argument("--tree-top-k", type=int, default=None, help="Draft tokens per stream")
    parser.add_argument("--tree-depth", type=int, default=None, help="Draft levels (streams) used")
    parser.add_argument(
        "--max-tree-nodes",
        type=int,
        default=None,
        help="Most nodes of a draft tree, root included (default: the model's config)",
    )
    parser.add_argument(
        "--dynamic-tree",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="An EAGLE drafter, an MTP layer or a --draft-model grows each tree from its own "
        "drafts (EAGLE-2's dynamic trees: --tree-top-k children of the --tree-top-k best nodes "
        "of each level, the best --max-tree-nodes kept; when sampling, each node's children "
        "drawn from its own distribution). Default: an EAGLE drafter's wherever the tree is "
        "wider than a chain; an MTP layer's as tuned for this device, else where asked; a "
        "draft model's where asked",
    )


def add_xtc_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--xtc-probability",
        type=float,
        default=DEFAULT_XTC_PROBABILITY,
        help="Probability of XTC sampling to happen each next token",
    )
    parser.add_argument(
        "--xtc-threshold",
        type=float,
        default=DEFAULT_XTC_THRESHOLD,
        help="Threshold the probs of each next token candidate to be sampled by XTC",
    )


def add_kv_quantization_args(parser: argparse.ArgumentParser) -> None:
    """``--kv-bits``, ``--kv-group-size`` and ``--quantized-kv-start``."""
    parser.add_argument(
        "--kv-bits",
        type=int,
        default=None,
        help="Number of bits for KV cache quantization (e.g., 4 or 8). Default: None (full "
        "precision)",
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        default=64,
        help="Group size for KV cache quantization (default: 64)",
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        default=5000,
        help="Token position to start KV cache quantization (default: 5000)",
    )


def add_prefill_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefill-step-size",
        type=int,
        default=DEFAULT_PREFILL_STEP_SIZE,
        help="Number of prompt tokens to process at a time. Smaller values lower peak memory "
        f"during prefill (default: {DEFAULT_PREFILL_STEP_SIZE})",
    )


def load_model(args, tokenizer_config: Optional[Dict[str, Any]] = None):
    """``(model, tokenizer)`` as the flags of :func:`add_model_args` say; with ``--draft
    ngram`` a plain mlx-lm model runs with prompt lookup alone (the verifier, no streams)."""
    from .utils import load

    return load(
        args.model,
        tokenizer_config={**(tokenizer_config or {}), "trust_remote_code": args.trust_remote_code},
        adapter_path=args.adapter_path,
        drafter=args.drafter,
        num_mtp_layers=args.num_mtp_layers,
        draft_vocab=args.draft_vocab,
        allow_plain=args.draft == "ngram"
        or getattr(args, "draft_model", None) is not None
        or getattr(args, "no_speculation", False),
    )


# The flags that say how to draft: a call that gives one decodes as its flags say, never
# with a tuning stored for the model (with_stored_tuning).
DRAFTING_FLAGS = ("draft", "num_draft_tokens", "ngram_candidates", "draft_confidence",
                  "draft_schedule", "no_speculation", "tree_top_k", "tree_depth", "max_tree_nodes",
                  "dynamic_tree", "num_mtp_layers", "draft_vocab")  # fmt: skip


def tuning_key(args) -> Dict[str, Any]:
    """The directories a tuning in the user's store is kept for (``--model``, else the
    embedded model, ``--drafter``, ``--draft-model``; hub ids resolved as loading resolves
    them), as :func:`~mlx_specstream.tuned_store.find_flags` takes them."""
    from .default_model import DEFAULT_DIR
    from .utils import resolve_model_path

    def resolved(name):
        value = getattr(args, name, None)
        return None if value is None else resolve_model_path(value)

    return dict(model=resolved("model") or DEFAULT_DIR, drafter=resolved("drafter"),
                draft_model=resolved("draft_model"))  # fmt: skip


def with_stored_tuning(parser: argparse.ArgumentParser, argv=None, log=print):
    """``parser``'s arguments from ``argv``, with the flags ``mlx_specstream.tune --save``
    stored in the user's store (:mod:`~mlx_specstream.tuned_store`) for this model, and its
    ``--drafter`` or ``--draft-model``, on this device: where the call names no drafting flag
    (:data:`DRAFTING_FLAGS`) and the model is not a directory of ours (those keep their
    tuning in their own config). What applies is said in ``log``; where a stored flag is one
    the command does not take (the server has no tree flags), none applies, and that is said."""
    from .utils import is_plain

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    taken = [k for k in DRAFTING_FLAGS if hasattr(args, k)]  # (those this command has)
    if any(getattr(args, k) != parser.get_default(k) for k in taken):  # (--draft-vocab none too)
        return args
    try:
        key = tuning_key(args)
        alone = key["drafter"] is None and key["draft_model"] is None
        if alone and not is_plain(key["model"]):  # (a directory of ours: its config's tuning)
            return args
    except FileNotFoundError:  # (no such directory, or no config.json: loading says so)
        return args
    from .precision import device_key
    from .tuned_store import find_flags, store_path

    flags, note = find_flags(device_key(), **key)
    if note is not None:
        log(note)
    if flags is None:
        return args
    said = f"{' '.join(flags)} (stored by mlx_specstream.tune --save in {store_path()})"
    unknown = [f for f in flags if f.startswith("--") and f not in parser._option_string_actions]
    if unknown:
        log(f"[INFO] Not applied: the tuning for this device, {said}, needs "
            f"{', '.join(unknown)}, which this command does not take.")  # fmt: skip
        return args
    log(f"[INFO] Tuned for this device ({device_key()}): {said}; a drafting flag overrides it.")
    return parser.parse_args(argv + flags)


# mlx_lm.generate's default draft length with --draft-model
DRAFT_MODEL_TOKENS = 3


def load_draft_model(args, tokenizer):
    """The ``--draft-model`` (``None`` without one), refused when its tokenizer's
    vocabulary size differs from the model's, as ``mlx_lm.generate`` refuses it;
    ``--draft-schedule heuristic`` without one is refused too."""
    if getattr(args, "draft_model", None) is None:
        if getattr(args, "draft_schedule", None) == "heuristic":
            raise ValueError(
                "--draft-schedule heuristic sets how long the --draft-model's chains are: pass "
                "--draft-model DIR (without one, drafts come from the model or prompt lookup)."
            )
        return None
    from mlx_lm import load as mlx_lm_load

    draft_model, draft_tokenizer = mlx_lm_load(args.draft_model)
    if draft_tokenizer.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"--draft-model {args.draft_model}: its tokenizer has {draft_tokenizer.vocab_size} "
            f"tokens, the model's {tokenizer.vocab_size}; they must match."
        )
    return draft_model
