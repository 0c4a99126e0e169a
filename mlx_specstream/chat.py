"""Chat with a model in the terminal, decoding with Speculative Streaming.

Run as ``python -m mlx_specstream.chat [--model DIR]``: ``mlx_lm.chat`` with our
decoder. The commands are mlx-lm's (``q`` quits, ``r`` resets the context,
``h`` shows help), and so is the conversation: each turn applies the chat
template to the system prompt and the new message only, and the KV cache
carries the earlier turns. After each answer the CLI also prints the tokens
per forward pass.
"""

import argparse
from typing import List, Optional

import mlx.core as mx
from mlx_lm.cli_ui import ChatUI

from .cache import make_prompt_cache
from .cli_args import (
    DRAFT_MODEL_TOKENS,
    add_draft_args,
    add_model_args,
    add_prefill_arg,
    add_xtc_args,
    load_draft_model,
    load_model,
    with_stored_tuning,
)
from .generate import SpeculativeUsage, stream_generate
from .sample_utils import make_sampler, xtc_special_tokens
from .server import join_messages

DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_SEED = 0
DEFAULT_MAX_TOKENS = 256


def setup_arg_parser():
    """mlx_lm.chat's flags (but distributed ``--pipeline``) and our drafting ones."""
    parser = argparse.ArgumentParser(description="Chat with an LLM (Speculative Streaming)")
    add_model_args(parser)
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="Sampling temperature")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="Sampling top-p")
    add_xtc_args(parser)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="PRNG seed")
    parser.add_argument(
        "--max-kv-size", type=int, default=None, help="Set the maximum key-value cache size"
    )
    add_prefill_arg(parser)
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="Maximum number of tokens to generate",
    )
    parser.add_argument(
        "--system-prompt", default=None, help="System prompt to be used for the chat template"
    )
    add_draft_args(parser)
    return parser


def turn_prompt(tokenizer, query: str, system_prompt: Optional[str]) -> List[int]:
    """One turn's tokens, as ``mlx_lm.chat`` makes them: the chat template over the
    system prompt and the new message only (mlx_lm.server's layout without a template)."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": query})
    if tokenizer.has_chat_template:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    return tokenizer.encode(join_messages(messages))


class SpecChatUI(ChatUI):
    """mlx-lm's chat UI, plus the tokens per forward pass after each answer."""

    usage: Optional[SpeculativeUsage] = None

    def end_turn(self, response):
        super().end_turn(response)
        if response is not None and self.usage is not None:
            print(f"  {self.usage.tokens_per_pass:.2f} tokens per forward pass", flush=True)


def main(argv=None):
    args = with_stored_tuning(setup_arg_parser(), argv)
    mx.random.seed(args.seed)
    model, tokenizer = load_model(args)
    # (a draft model that does not draft is not loaded: tuned so, or --no-speculation)
    draft_model = None if args.no_speculation else load_draft_model(args, tokenizer)
    args.model = args.model or "mlx-specstream-default"  # (the UI's header shows it)
    sampler = make_sampler(
        args.temp,
        args.top_p,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=xtc_special_tokens(tokenizer),
    )
    # (only those given: the model's own settings apply to the rest)
    drafting = {
        k: getattr(args, k)
        for k in ("draft", "num_draft_tokens", "ngram_candidates", "tree_top_k", "tree_depth",
                  "max_tree_nodes", "dynamic_tree", "draft_confidence",
                  "draft_schedule")  # fmt: skip
        if getattr(args, k) is not None
    }
    if draft_model is not None:  # (mlx_lm.generate's default draft length)
        drafting.update(draft_model=draft_model)
        drafting.setdefault("num_draft_tokens", DRAFT_MODEL_TOKENS)

    def new_cache():  # the model's layers, then any draft model's (as mlx-lm keeps them)
        # (it only grows: sliding-window layers keep 2 to 3 windows, not the whole chat)
        return make_prompt_cache(model, args.max_kv_size, draft_model, bounded=True)

    with SpecChatUI(args) as ui:
        # (after each answer the cache holds all of it, as mlx-lm's does)
        cache = new_cache()
        while True:
            query = ui.prompt()
            if query == "q":
                ui.say_bye()
                break
            if query == "r":
                cache = new_cache()
                ui.say_reset()
                continue
            if query == "h":
                ui.say_help()
                continue
            prompt = turn_prompt(tokenizer, query, args.system_prompt)
            response, ui.usage = None, SpeculativeUsage()
            for response in stream_generate(
                model,
                tokenizer,
                prompt,
                max_tokens=args.max_tokens,
                sampler=sampler,
                speculative=not args.no_speculation,
                prompt_cache=cache,
                prefill_step_size=args.prefill_step_size,
                max_kv_size=args.max_kv_size,
                **drafting,
            ):
                ui.stream_token(response.text)
                ui.usage.add(response)
            ui.end_turn(response)


if __name__ == "__main__":
    main()
