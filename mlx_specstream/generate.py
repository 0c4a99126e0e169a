"""``stream_generate`` / ``generate`` (mlx-lm compatible) and the generate CLI.

Run as ``python -m mlx_specstream.generate --prompt "..."``.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Generator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse, wired_limit, generation_stream
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .cli_args import (
    add_draft_args,
    add_kv_quantization_args,
    add_model_args,
    add_prefill_arg,
    add_xtc_args,
    DRAFT_MODEL_TOKENS,
    load_draft_model,
    load_model,
    with_stored_tuning,
)
from .decode import ACCEPTANCE, spec_generate_step
from .precision import device_key
from .sample_utils import make_sampler, xtc_special_tokens
from .streams import runtime_config

DEFAULT_PROMPT = "def fibonacci(n):"
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_SEED = None
DEFAULT_MIN_TOKENS_TO_KEEP = 1


@dataclass
class SpecGenerationResponse(GenerationResponse):
    """mlx-lm's ``GenerationResponse`` plus the cumulative ``forward_passes``.

    ``from_draft`` is True for tokens accepted from a stream draft.
    """

    forward_passes: int = 0


@dataclass
class SpeculativeUsage:
    """What speculation did in one generation, from its responses.

    * ``forward_passes``: decode passes, each verifying one draft tree (or
      feeding one token without speculation). The first one is included: it
      runs on the prompt's last token and yields the first token. The prefill
      chunks over the other prompt tokens are not counted.
    * ``accepted_draft_tokens``: generated tokens that came from an accepted
      draft (``from_draft``); the others are the correction or bonus token of
      each pass.
    * ``tokens_per_pass``: generated tokens / forward passes (τ).
    * ``batched_tokens``: generated tokens that came from a batched pass, one row of
      several requests' (the server's :class:`~mlx_specstream.replies.Batch`, where
      each counts as a pass of its own, or :class:`~mlx_specstream.replies.SpecBatch`,
      whose rows accept drafts from prompt lookup or a draft model).

    Generated tokens include the last one (an EOS token too), as
    ``generation_tokens`` counts them.
    """

    generated_tokens: int = 0
    forward_passes: int = 0
    accepted_draft_tokens: int = 0
    batched_tokens: int = 0
    _before: Tuple[int, int] = field(default=(0, 0), repr=False, compare=False)

    def add(self, response: "SpecGenerationResponse") -> None:
        """Takes a speculative generation's response (its counts start at :meth:`resume`)."""
        passes = getattr(response, "forward_passes", response.generation_tokens)
        self.generated_tokens = self._before[0] + response.generation_tokens
        self.forward_passes = self._before[1] + passes
        self.accepted_draft_tokens += bool(response.from_draft)

    def resume(self) -> None:
        """A new generation goes on from here (a server's choice back from a batch)."""
        self._before = (self.generated_tokens, self.forward_passes)

    def add_batched(self, from_draft: bool = False) -> None:
        """Counts a token from a batched pass: an accepted draft token (a row of a
        speculative batch), or the row's own token, which ends its pass."""
        self.generated_tokens += 1
        self.forward_passes += not from_draft
        self.accepted_draft_tokens += from_draft
        self.batched_tokens += 1

    @property
    def tokens_per_pass(self) -> float:
        return self.generated_tokens / max(self.forward_passes, 1)

    def as_dict(self) -> dict:
        return {
            "forward_passes": self.forward_passes,
            "accepted_draft_tokens": self.accepted_draft_tokens,
            "tokens_per_pass": round(self.tokens_per_pass, 4),
            "batched_tokens": self.batched_tokens,
        }


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, bytes, mx.array, List[int]],
    max_tokens: int = 256,
    sampler=None,
    logits_processors=None,
    speculative: bool = True,
    draft: Optional[str] = None,
    **kwargs,
) -> Generator[SpecGenerationResponse, None, None]:
    """Generates text from ``prompt`` with Speculative Streaming, streaming responses.

    Args:
        model (nn.Module): a model from :func:`mlx_specstream.load` (or with
          streams attached by :func:`mlx_specstream.attach_streams`).
        tokenizer: the tokenizer (wrapped in mlx-lm's ``TokenizerWrapper`` if needed).
        prompt (str, bytes, mx.array or list of int): the prompt text (bytes
          must be UTF-8) or tokens.
        max_tokens (int): tokens to generate, ``-1`` for no limit. Default: ``256``.
        sampler (Callable, optional): an mlx-lm sampler (``make_sampler``).
          Default: greedy.
        logits_processors (list, optional): mlx-lm logits processors.
        speculative (bool): ``False`` decodes one token per forward pass.
          Default: ``True``.
        draft (str, optional): ``"streams"``, ``"ngram"`` (prompt lookup, any
          model) or ``"streams+ngram"``; ``None``: the source the model's config
          names, else its own drafts. Passed on only when set.
        kwargs: passed to :func:`mlx_specstream.decode.spec_generate_step`
          (``prompt_cache``, ``prefill_step_size``, ``tree_top_k``,
          ``tree_depth``, ``prune_threshold``, ``max_tree_nodes``, ``dynamic_tree``,
          ``ngram_candidates``, and mlx-lm's
          ``draft_model``, ``num_draft_tokens``, ``kv_bits``, ``kv_group_size``,
          ``quantized_kv_start``, ``max_kv_size``).

    Yields:
        SpecGenerationResponse: one per generated token.
    """
    if max_tokens == 0 or max_tokens < -1:
        raise ValueError(f"max_tokens={max_tokens} must be positive (or -1 for no limit).")
    # mlx-lm's arguments that this decoder does not take: refused by name when set.
    if kwargs.pop("input_embeddings", None) is not None:
        raise ValueError("input_embeddings: speculative decoding here takes token prompts only.")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"The prompt is not valid UTF-8: byte {e.start} ({prompt[e.start:e.start + 1]!r})."
            ) from None
    if isinstance(prompt, str):
        _check_encodable(prompt)
    if not isinstance(prompt, mx.array):
        if isinstance(prompt, str):
            add_special_tokens = tokenizer.bos_token is None or not prompt.startswith(
                tokenizer.bos_token
            )
            prompt = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        prompt = mx.array(prompt, dtype=mx.int32)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    if draft is not None:
        kwargs["draft"] = draft
    tokens = spec_generate_step(
        prompt,
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=logits_processors,
        speculative=speculative,
        **kwargs,
    )

    def response(token, logprobs, from_draft, passes, n, finish_reason):
        return SpecGenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=from_draft,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / (time.perf_counter() - tic),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason,
            forward_passes=passes,
        )

    # ``tokens`` is closed explicitly, also when this generator is closed early
    # (a stop string, a client hanging up), so the prompt cache is rewound
    # before the caller goes on, not whenever the generator is collected.
    with wired_limit(model, [generation_stream]):
        try:
            tic = time.perf_counter()
            for n, (token, logprobs, from_draft, passes) in enumerate(tokens):
                if n == 0:
                    prompt_tps = prompt.size / (time.perf_counter() - tic)
                    tic = time.perf_counter()
                if token in tokenizer.eos_token_ids:
                    break
                detokenizer.add_token(token)
                if (n + 1) == max_tokens:
                    break
                yield response(token, logprobs, from_draft, passes, n, None)
        finally:
            tokens.close()
        detokenizer.finalize()
        finish = "stop" if token in tokenizer.eos_token_ids else "length"
        yield response(token, logprobs, from_draft, passes, n, finish)


def _check_encodable(text: str):
    """Refuses text with lone surrogates, which no UTF-8 tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"The prompt is not valid Unicode text: character {e.start} is a lone surrogate "
            f"({text[e.start]!r}); decode the input as UTF-8 first."
        ) from None


def generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, mx.array, List[int]],
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generates a complete response; same arguments as :func:`stream_generate`.

    Args:
        verbose (bool): print the text as it comes, then tokens/s, tokens per
          forward pass and peak memory. Default: ``False``.

    Returns:
        str: the generated text.
    """
    return _generate(model, tokenizer, prompt, verbose, **kwargs)[0]


def _generate(model, tokenizer, prompt, verbose=False, **kwargs):
    """:func:`generate`, also returning the last :class:`SpecGenerationResponse`."""
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    usage = SpeculativeUsage()
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
        usage.add(response)
    if verbose:
        print()
        print("=" * 10)
        print_stats(response, usage)
    return text, response


def print_stats(response: SpecGenerationResponse, usage: Optional[SpeculativeUsage] = None):
    """Prints the figures that matter for one finished generation: the same
    ones as the server's ``usage`` (see :class:`SpeculativeUsage`)."""
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
    print(
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec"
    )
    if usage is None:
        usage = SpeculativeUsage(response.generation_tokens, response.forward_passes)
    print(
        f"Forward passes: {usage.forward_passes}, "
        f"accepted draft tokens: {usage.accepted_draft_tokens}, "
        f"{usage.tokens_per_pass:.2f} tokens per forward pass "
        "(decode passes; the prefill of the prompt is not counted)"
    )
    print(f"Peak memory: {response.peak_memory:.3f} GB")


MIN_PASSES_TO_JUDGE = 32  # (fewer passes say too little about the drafts)


def low_acceptance_note(response: Optional[SpecGenerationResponse]) -> Optional[str]:
    """What the CLI says when the model's own drafts were almost never accepted: about
    one token per pass over many passes, as streams or heads trained for another base
    (or dropped by a conversion) draft. ``None`` otherwise."""
    if response is None or response.forward_passes < MIN_PASSES_TO_JUDGE:
        return None
    tau = response.generation_tokens / response.forward_passes
    if tau >= 1.1:
        return None
    return (
        f"[WARN] The drafts were almost never accepted: {tau:.2f} tokens per forward pass "
        f"over {response.forward_passes} passes, so speculation cost time here. Drafts that "
        "do not fit the model (trained for another base, or lost in a conversion) look like "
        "this; --compare-plain measures the cost, and `python -m mlx_specstream.train` "
        "trains streams for this model."
    )


def untuned_note(config, model: Optional[str] = None) -> Optional[str]:
    """What the CLIs say when ``config`` was tuned on other devices than this one
    (its own draft settings then apply here), or ``None``."""
    if not getattr(config, "tuned", None) or config.tuned_on is not None:
        return None
    where = "" if model is None else f" --model {model}"
    return (
        f"[INFO] This model was tuned on {', '.join(sorted(config.tuned))}, not on this device "
        f"({device_key()}): using its own draft settings. `python -m mlx_specstream.tune{where} "
        "--save` measures the fastest here."
    )


def setup_arg_parser():
    parser = argparse.ArgumentParser(description="Generate text with Speculative Streaming.")
    add_model_args(parser)
    parser.add_argument(
        "--extra-eos-token",
        type=str,
        default=(),
        nargs="+",
        help="Add tokens in the list of eos tokens that stop generation.",
    )
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="Prompt ('-' reads stdin)")
    parser.add_argument(
        "--prefill-response", default=None, help="Prefill response to be used for the chat template"
    )
    parser.add_argument("--system-prompt", default=None, help="System prompt for the chat template")
    parser.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="Sampling temperature")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="Sampling top-p")
    parser.add_argument("--min-p", type=float, default=0.0, help="Sampling min-p")
    parser.add_argument("--top-k", type=int, default=0, help="Sampling top-k (not the tree's)")
    add_xtc_args(parser)
    parser.add_argument(
        "--min-tokens-to-keep",
        type=int,
        default=DEFAULT_MIN_TOKENS_TO_KEEP,
        help="Minimum tokens to keep for min-p sampling.",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="PRNG seed")
    parser.add_argument("--ignore-chat-template", action="store_true")
    parser.add_argument("--use-default-chat-template", action="store_true")
    parser.add_argument("--chat-template-config", default=None, help="JSON kwargs for the template")
    parser.add_argument("--verbose", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    add_draft_args(parser)
    parser.add_argument("--prune-threshold", type=float, default=None)
    parser.add_argument(
        "--acceptance",
        choices=ACCEPTANCE,
        default=None,
        help="How drafts are verified when sampling; both are lossless (default: rejection)",
    )
    parser.add_argument(
        "--compare-plain",
        action="store_true",
        help="Then decode the same prompt with mlx-lm's plain loop on the same weights: its "
        "tokens/s, the speedup, and whether the outputs are identical",
    )
    parser.add_argument(
        "--max-kv-size", type=int, default=None, help="Set the maximum key-value cache size"
    )
    add_kv_quantization_args(parser)
    add_prefill_arg(parser)
    parser.add_argument(
        "--prompt-cache-file",
        default=None,
        help="A file containing saved KV caches to avoid recomputing them (mlx_lm.cache_prompt's)",
    )
    return parser


def main(argv=None):
    args = with_stored_tuning(setup_arg_parser(), argv)
    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt_cache, metadata = None, {}
    if args.prompt_cache_file is not None:
        prompt_cache, metadata = load_cache_file(args.prompt_cache_file, args)
        args.model = args.model or metadata["model"]
    model, tokenizer = load_model(args, json.loads(metadata.get("tokenizer_config", "{}")))
    for eos_token in args.extra_eos_token:
        tokenizer.add_eos_token(eos_token)
    # (a draft model that does not draft is not loaded: tuned so, or --no-speculation)
    draft_model = None if args.no_speculation else load_draft_model(args, tokenizer)
    if draft_model is not None and prompt_cache is not None:
        raise ValueError(
            f"--prompt-cache-file {args.prompt_cache_file} with --draft-model: the file holds "
            "the model's cache only, not the draft model's."
        )
    config = runtime_config(model)
    if prompt_cache is not None and getattr(config, "mode", None) == "shared":
        raise ValueError(
            f"--prompt-cache-file {args.prompt_cache_file}: {args.model} is a shared-mode stream "
            "model, whose main rows attend to their streams; a cache made by mlx_lm.cache_prompt "
            "holds the keys and values of the model without them."
        )
    from_config = args.tree_depth is None and not args.no_speculation and draft_model is None
    tuned_on = getattr(config, "tuned_on", None)  # (plain models have no config section)
    draft = args.draft or getattr(config, "draft", None) or "streams"
    turned_off = from_config and config.tree_depth == 0 and draft == "streams"
    if turned_off:
        why = (
            f"mlx_specstream.tune measured on this device ({tuned_on}) that it does not pay"
            if tuned_on
            else "tree_depth = 0"
        )
        print(
            f"[INFO] This model's config turns speculation off ({why}): decoding one token per "
            "pass. Pass --tree-depth or --draft ngram to override."
        )
    elif from_config and (note := untuned_note(config, args.model)):
        print(note)
    prompt = chat_prompt(tokenizer, args, cached=prompt_cache is not None)
    num_draft_tokens = args.num_draft_tokens
    if num_draft_tokens is None and draft_model is not None:
        num_draft_tokens = DRAFT_MODEL_TOKENS
    sampler = make_sampler(
        args.temp,
        args.top_p,
        args.min_p,
        args.min_tokens_to_keep,
        top_k=args.top_k,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=xtc_special_tokens(tokenizer),
    )
    generation = dict(
        max_tokens=args.max_tokens,
        sampler=sampler,
        speculative=not args.no_speculation,
        tree_top_k=args.tree_top_k,
        tree_depth=args.tree_depth,
        prune_threshold=args.prune_threshold,
        max_tree_nodes=args.max_tree_nodes,
        **({} if args.dynamic_tree is None else {"dynamic_tree": args.dynamic_tree}),
        acceptance=args.acceptance,
        draft=args.draft,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
        **({} if args.draft_confidence is None else {"draft_confidence": args.draft_confidence}),
        **({} if args.draft_schedule is None else {"draft_schedule": args.draft_schedule}),
        **({} if args.ngram_candidates is None else {"ngram_candidates": args.ngram_candidates}),
        prompt_cache=prompt_cache,
        prefill_step_size=args.prefill_step_size,
        max_kv_size=args.max_kv_size,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
    )

    # The reference runs start from the file's cache too, each from a fresh copy.
    def fresh_cache():
        return load_cache_file(args.prompt_cache_file, args)[0] if prompt_cache else None

    if args.compare_plain:  # a short warm-up first, so that neither timed run is cold
        n = 8 if args.max_tokens < 0 else min(8, args.max_tokens)  # (-1: no limit)
        warm = dict(generation, max_tokens=n, prompt_cache=fresh_cache())
        _generate(model, tokenizer, prompt, **warm)
    if args.seed is not None:  # (seeded here, a warm-up before it changes nothing)
        mx.random.seed(args.seed)
    text, response = _generate(model, tokenizer, prompt, verbose=args.verbose, **generation)
    # Prompt lookup finds nothing to copy in much text: only the model's drafts are judged.
    own_drafts = draft_model is None and draft in ("streams", "streams+ngram")
    model_drafts = own_drafts and not (args.no_speculation or turned_off)
    if model_drafts and (note := low_acceptance_note(response)):
        print(note)
    if args.compare_plain:
        compare_with_plain(model, tokenizer, prompt, text, response, args, sampler, fresh_cache)


def load_cache_file(path: str, args):
    """``(prompt_cache, metadata)`` of an ``mlx_lm.cache_prompt`` file, checked against
    the command's ``--model`` and KV quantization flags as ``mlx_lm.generate`` checks them."""
    from mlx_lm.models.cache import QuantizedKVCache

    from .cache_file import load_prompt_cache  # (mlx-lm's files, and ours: bounded again)

    cache, metadata = load_prompt_cache(path, return_metadata=True)
    if args.model is not None and metadata.get("model") not in (None, args.model):
        raise ValueError(
            f"--prompt-cache-file {path} was made with the model {metadata['model']}, not "
            f"--model {args.model}."
        )
    if isinstance(cache[0], QuantizedKVCache):
        if args.kv_bits is not None and args.kv_bits != cache[0].bits:
            raise ValueError(
                f"--kv-bits {args.kv_bits} does not match the {cache[0].bits}-bit KV cache of "
                f"--prompt-cache-file {path}."
            )
        if args.kv_group_size != cache[0].group_size:
            raise ValueError(
                f"--kv-group-size {args.kv_group_size} does not match the KV cache of "
                f"--prompt-cache-file {path} (group size {cache[0].group_size})."
            )
    return cache, metadata


def chat_prompt(tokenizer, args, cached: bool = False) -> List[int]:
    """The prompt's tokens, through the chat template as ``mlx_lm.generate`` builds them.

    With a cached prefix (``--prompt-cache-file``) only the text after the cached
    part of the template is kept, as in mlx-lm.
    """
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
    if args.use_default_chat_template and tokenizer.chat_template is None:
        tokenizer.chat_template = tokenizer.default_chat_template
    use_chat = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat:
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        prefill = args.prefill_response is not None
        if prefill:
            messages.append({"role": "assistant", "content": args.prefill_response})
        template = dict(
            tokenize=False, continue_final_message=prefill, add_generation_prompt=not prefill
        )
        template_kwargs = json.loads(args.chat_template_config or "{}")
        prompt = tokenizer.apply_chat_template(messages, **template, **template_kwargs)
        if cached:  # the prompt is the suffix of what the cache holds
            messages[-1]["content"] = "<query>"
            test_prompt = tokenizer.apply_chat_template(messages, **template)
            prompt = prompt[test_prompt.index("<query>") :]
    return tokenizer.encode(prompt, add_special_tokens=not use_chat)


def compare_with_plain(
    model, tokenizer, prompt, text, ours, args, sampler=None, fresh_cache=lambda: None
):
    """Prints mlx-lm's plain decoding speed on the same weights and prompt, the
    speedup, and (greedy) whether the two outputs are identical. One run each, the
    speculative one first, after a short warm-up (``main``): ``python -m
    mlx_specstream.benchmark`` measures with repeats. ``fresh_cache()`` gives each
    reference run the prompt cache this run started from (None: none)."""
    from mlx_lm.generate import stream_generate as mlx_stream_generate

    sampler = sampler or make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    kwargs = dict(
        max_tokens=args.max_tokens,
        max_kv_size=args.max_kv_size,
        prompt_cache=fresh_cache(),
        prefill_step_size=args.prefill_step_size,
    )
    if args.kv_bits is not None:
        kwargs.update(kv_bits=args.kv_bits, kv_group_size=args.kv_group_size,
                      quantized_kv_start=args.quantized_kv_start)  # fmt: skip
    plain_text, last = "", None
    for last in mlx_stream_generate(model, tokenizer, mx.array(prompt), sampler=sampler, **kwargs):
        plain_text += last.text
    config = runtime_config(model)
    print(
        f"Plain decoding (mlx-lm's loop, same weights): {last.generation_tokens} tokens, "
        f"{last.generation_tps:.3f} tokens-per-sec. This run: "
        f"{ours.generation_tps / last.generation_tps:.2f}x its speed"
    )
    if args.temp > 0:
        print("Outputs: sampled (temp > 0), so they are not compared token for token")
    elif config.mode == "shared":  # (a drafter's config is never shared mode)
        # Shared mode's main rows see their streams: mlx-lm's loop is not this model.
        ref = generate(
            model,
            tokenizer,
            prompt,
            max_tokens=args.max_tokens,
            speculative=False,
            prompt_cache=fresh_cache(),
        )
        print(f"Output identical to this model's own plain decoding: {_yes(ref == text)}")
    else:
        print(f"Output identical to plain decoding: {_yes(plain_text == text)}")


def _yes(same: bool) -> str:
    return "yes" if same else "NO (please report this: the output must not change)"


if __name__ == "__main__":
    main()
