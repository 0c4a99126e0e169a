"""What a build of the embedded model decides: data, sizes and training budgets.

``convert.build_default_model --recipe NAME`` runs the same stages for every
recipe; a recipe only fills in their arguments.

* ``stdlib``: the shipped 6.5M-parameter model, sized for 2 CPU cores (about
  two hours): the standard library as corpus, an 8k tokenizer, every fine-tune
  500 steps of 8 x 128 tokens (``benchmarks/RESULTS.md``, "The build").
* ``code``: issue #12's recipe, sized for one GPU: every Python source of the
  interpreter (``convert.code_corpus``, held-out packages never written), a 16k
  tokenizer, a 32M-parameter base trained on 301M tokens, a shared-mode fine-tune
  with its control (same LoRA, data and budget, no streams), a lossless
  fine-tune and Medusa-1 / ParallelSpec drafters on one self-distilled set,
  the parse-rate quality figure, and a 4-bit base to fit the package. It runs
  on CPU too, about a thousand times slower.
* ``code-cpu``: the ``code`` recipe's smaller sibling for 2 CPU cores: the same corpus,
  tokenizer and stages, an 8.5M-parameter base on 12.3M tokens (base and lossless
  fine-tune in one session, the control and drafters in a second).
* ``smoke``: the ``code`` stages at toy sizes, for the build's own test.

On CUDA the training stages add ``--bf16`` (``Recipe.gpu_args``).
"""

import json
from dataclasses import dataclass, replace
from typing import Optional, Tuple

Args = Tuple[str, ...]


def arch(**kw) -> Args:
    """``--arch`` JSON overrides of ``convert.pretrain``'s Llama."""
    return ("--arch", json.dumps(kw))


@dataclass(frozen=True)
class Recipe:
    name: str
    corpus: str  # "stdlib" (convert.corpus) or "code" (convert.code_corpus)
    tokenizer: Args  # convert.tokenizer
    base: Args  # convert.pretrain: the base model
    draft: Args  # convert.pretrain: mlx-lm's draft model, same tokenizer
    ss_common: Args  # convert.finetune, both modes
    ss_shared: Args
    ss_lossless: Args
    drafter_common: Args  # convert.train_drafter
    # convert.distill: (train examples, eval examples, further args). The lossless
    # fine-tune trains on it when ``lossless_on_distilled`` (else it distills inline).
    distill: Tuple[int, int, Args]
    lossless_on_distilled: bool
    control: bool  # also train shared mode's control fine-tune
    drafters: bool  # Medusa-1 and ParallelSpec in the build itself
    eval_sample_files: Optional[int]  # held-out files the fine-tunes evaluate on (None: all)
    quality_prompts: int  # held-out function headers for the parse rate (0: not measured)
    quality_max_tokens: int
    tau_prompts: int  # held-out prompts of the mode choice
    tau_max_tokens: int
    convert: Args = ("--dtype", "bfloat16")  # python -m convert, stream models
    draft_convert: Args = ("--dtype", "bfloat16")  # mlx_lm convert, the draft model
    # What the shipped models may take: the tracked tree (30 MB, it travels to the GPU
    # machine) less its other files (convert.package_size counts a recipe's before training).
    ship_limit_mb: float = 23.0
    # The shipped model's own draft settings, which apply on devices no tuner has measured
    # (tuned ones go under "tuned", per device); None keeps the fine-tune's.
    untuned_tree: Optional[dict] = None
    gpu_args: Args = ("--bf16",)
    # Appended to every training stage off CUDA: the same tokens per step in smaller
    # micro-batches (a 64 x 1,024 batch of the code recipe's base needs more than 24 GB).
    cpu_args: Args = ()
    time_limit: Optional[float] = None  # minutes per training stage (set by --time-limit)
    # Replace each pretrained model by its 8-bit round trip (convert.transport) right after
    # training, so the model every later stage uses is the one that can travel.
    round_trip: bool = False


_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_SS_LOSSLESS_CPU = ("--mode", "lossless", "--stream-lora-rank", "16", "--stream-loss-weight", "1.0")

# fmt: off
STDLIB = Recipe(
    name="stdlib",
    corpus="stdlib",
    tokenizer=("--vocab-size", "8000"),
    base=(),  # convert.pretrain's defaults: 6.5M parameters, 1,000 steps of 16 x 256
    draft=("--max-steps", "600", "--learning-rate", "3e-3",
           *arch(hidden_size=96, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=256)),
    # A CPU budget: a few hundred steps of 8 x 128 tokens (the paper trains 5 epochs and can
    # afford alpha_j = 0.1; with this budget the streams need a larger weight to learn). The
    # shared run below is the one the committed build made; alpha_j 0.5 costs its main
    # stream 0.57 nats against the control, and alpha_j 0.1 with the streams' own lr 1e-2
    # 0.005 ("Shared mode against its control": benchmarks/shared_control.py).
    ss_common=("--num-streams", "3", "--num-stream-layers", "4", "--top-k", "3",
               "--max-length", "128", "--batch-size", "8", "--learning-rate", "1e-3",
               "--eval-steps", "200", "--save-steps", "100"),
    ss_shared=("--mode", "shared", "--lora-rank", "32", "--lora-alpha", "64",
               "--max-steps", "400", "--stream-loss-weight", "0.5"),
    # lr 1e-2 and the LoRA on the MLP alone: more tau, 32 fewer kernels per step than lr 1e-3
    # on every module ("The recipe's learning rate", "Which modules the stream LoRA adapts");
    # 3,000 steps over 12,000 windows drafted 4-6% more than 1,000 over 4,000 (about an hour).
    ss_lossless=(*_SS_LOSSLESS_CPU, "--self-distill", "--window-prompt", "32",
                 "--max-examples", "12000", "--learning-rate", "1e-2",
                 "--stream-lora-targets", *_MLP, "--max-steps", "3000"),
    drafter_common=("--num-draft-tokens", "3", "--top-k", "3", "--max-length", "128",
                    "--batch-size", "8", "--learning-rate", "1e-3", "--max-steps", "500",
                    "--eval-steps", "250", "--save-steps", "100"),
    distill=(4000, 200, ("--max-length", "128", "--window-prompt", "32")),
    lossless_on_distilled=False,
    control=False,
    drafters=False,  # built by benchmarks/compare_drafters.py
    eval_sample_files=None,
    quality_prompts=0,
    quality_max_tokens=0,
    tau_prompts=8,
    tau_max_tokens=96,
    # A chain of 3 streams, mlx-lm's default draft length: wherever verifying is cheap it beat
    # the paper's 16-node tree (OpenBLAS: 1.48-1.70x against 0.84-0.90x plain decoding), and
    # it builds a step in 0.74 ms against 1.11 ms, which bounds a small model on a GPU.
    untuned_tree={"top_k": 1, "max_tree_nodes": 4},
)

# 32M parameters: 16k x 512 tied embeddings (8.2M) and 8 layers of 2.9M.
_CODE_BASE_ARCH = arch(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=4, intermediate_size=1408,
                       max_position_embeddings=1024, tie_word_embeddings=True)
_CODE_FT = ("--num-streams", "3", "--num-stream-layers", "4", "--top-k", "3",
            "--max-length", "256", "--batch-size", "64", "--learning-rate", "1e-3",
            "--max-steps", "3000", "--eval-steps", "500", "--save-steps", "500")

CODE = Recipe(
    name="code",
    corpus="code",
    # A newline may start a piece: 2.2% fewer tokens on held-out code (benchmarks/RESULTS.md).
    tokenizer=("--vocab-size", "16000", "--newline-pieces"),
    # 4,600 steps x 64 x 1,024 = 301M tokens (~4 passes over this machine's 72M-token corpus).
    base=("--seq-len", "1024", "--batch-size", "64", "--max-steps", "4600",
          "--learning-rate", "1e-3", "--eval-rows", "256", "--eval-steps", "500",
          "--save-steps", "500", *_CODE_BASE_ARCH),
    # 5.6M parameters (most of them the embeddings), trained like the base.
    draft=("--seq-len", "1024", "--batch-size", "64", "--max-steps", "4600",
           "--learning-rate", "2e-3", "--eval-rows", "256", "--eval-steps", "500",
           "--save-steps", "500",
           *arch(hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=704)),
    ss_common=_CODE_FT,
    # The paper's shared-mode recipe: LoRA on every linear layer, alpha_j = 0.1. The LoRA is
    # kept as an adapter (10 MB, where a merged model is 128): it travels between machines.
    # The stream embeddings at lr 1e-2: on the stdlib base their own rate took shared mode's
    # main loss from +0.13 to +0.005 nats of its control's, and doubled stream top-1
    # ("Shared mode against its control"; the control ignores it).
    ss_shared=("--mode", "shared", "--lora-rank", "32", "--lora-alpha", "64",
               "--stream-loss-weight", "0.1", "--learning-rate", "5e-4",
               "--stream-learning-rate", "1e-2", "--save-adapter"),
    # As the stdlib recipe's since its retrain (tau +30%, 32 fewer kernels per step): lr 1e-2
    # and the stream LoRA on the MLP; at batch 8 on CPU, not yet at this budget.
    ss_lossless=(*_SS_LOSSLESS_CPU, "--learning-rate", "1e-2", "--stream-lora-targets", *_MLP),
    drafter_common=("--num-draft-tokens", "3", "--top-k", "3", "--max-length", "256",
                    "--batch-size", "64", "--learning-rate", "1e-3", "--max-steps", "3000",
                    "--eval-steps", "500", "--save-steps", "500"),
    # 32k windows of 256 tokens: 64-token prompts, 192 greedy tokens of the base (about
    # 10 MB compressed: with the 30 MB base and the 19 MB tree it fits one 64 MiB carry).
    distill=(32_000, 512, ("--max-length", "256", "--window-prompt", "64",
                           "--batch-size", "256")),
    lossless_on_distilled=True,
    control=True,
    drafters=True,
    eval_sample_files=64,
    quality_prompts=50,
    quality_max_tokens=256,
    tau_prompts=16,
    tau_max_tokens=128,
    # 32M parameters in bfloat16 are 64 MB. The package may take 23 MB: a 4-bit base (17.9 MB)
    # fits beside its streams and tokenizer, but not with a draft model too (26.3 MB with a
    # 4-bit one, 34.3 with a bfloat16 one), so the base ships at 3 bits (13.9 MB) and the
    # draft model at 4 (22.3 MB in all; benchmarks/results/package_budget-code-s60.md). On the
    # shipped 6.5M model 3 bits cost 0.037 nats of held-out loss, 4 bits 0.008 (RESULTS.md).
    convert=("--dtype", "bfloat16", "--quantize", "--q-bits", "3", "--q-group-size", "64"),
    draft_convert=("--dtype", "bfloat16", "-q", "--q-bits", "4", "--q-group-size", "64"),
    round_trip=True,
    cpu_args=("--batch-size", "8", "--gradient-accumulation-steps", "8"),
)

# The code recipe's smaller sibling, sized for one session on 2 CPU cores: the same corpus,
# tokenizer and stages; an 8.5M-parameter base (16k x 256 tied embeddings and 6 layers of
# 0.7M) trained on 12.3M tokens in bfloat16 autocast (AVX512-BF16: 3.3 s per 16 x 512-token
# step on this project's CPU against 5.9 s in float32; 89 minutes), and a lossless fine-tune of
# 400 steps on 3,200 self-distilled windows (25 minutes): one session. The draft model, the
# shared-mode fine-tune with its control and the Medusa-1 / ParallelSpec drafters take a
# second (the build resumes stage by stage; benchmarks/RESULTS.md, "The CPU sibling").
_CODE_CPU_FT = ("--num-streams", "3", "--num-stream-layers", "4", "--top-k", "3",
                "--max-length", "256", "--batch-size", "8", "--eval-steps", "200",
                "--save-steps", "100")

# Fields not named here are the code recipe's: its corpus, tokenizer, held-out sample and
# the figures measured on it (parse rate, tau).
CODE_CPU = replace(
    CODE,
    name="code-cpu",
    base=("--seq-len", "512", "--batch-size", "16", "--max-steps", "1500",
          "--learning-rate", "2e-3", "--eval-rows", "64", "--eval-steps", "500",
          "--save-steps", "200",
          *arch(hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=704,
                max_position_embeddings=1024, tie_word_embeddings=True)),
    draft=("--seq-len", "512", "--batch-size", "16", "--max-steps", "800",
           "--learning-rate", "3e-3", "--eval-rows", "64", "--eval-steps", "400",
           "--save-steps", "200",
           *arch(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=352,
                 max_position_embeddings=1024, tie_word_embeddings=True)),
    ss_common=_CODE_CPU_FT,
    ss_shared=("--mode", "shared", "--lora-rank", "32", "--lora-alpha", "64",
               "--stream-loss-weight", "0.5", "--learning-rate", "1e-3", "--max-steps", "400"),
    # lr 1e-2: 12-23% more tau than 1e-3 at 100-300 steps ("The stream recipe's learning rate").
    ss_lossless=(*_SS_LOSSLESS_CPU, "--learning-rate", "1e-2", "--max-steps", "400"),
    drafter_common=("--num-draft-tokens", "3", "--top-k", "3", "--max-length", "256",
                    "--batch-size", "16", "--learning-rate", "1e-3", "--max-steps", "500",
                    "--eval-steps", "250", "--save-steps", "100"),
    distill=(3200, 128, ("--max-length", "256", "--window-prompt", "64",
                         "--batch-size", "64")),
    # 8.5M parameters in bfloat16 (17.1 MB) and the 4-bit draft model come to 23.5 MB, above
    # the package's 23: the base ships at 8 bits (15.5 MB in all; 0.0003 nats of held-out
    # loss on the shipped 6.5M model). Nothing travels, so no 8-bit round trip.
    convert=("--dtype", "bfloat16", "--quantize", "--q-bits", "8", "--q-group-size", "64"),
    round_trip=False,
    cpu_args=("--bf16",),
)

SMOKE = Recipe(
    name="smoke",
    corpus="code",
    tokenizer=("--vocab-size", "400", "--input-sentences", "20000", "--newline-pieces"),
    base=("--seq-len", "64", "--batch-size", "4", "--max-steps", "4", "--eval-rows", "4",
          "--eval-steps", "2", "--save-steps", "2",
          *arch(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, max_position_embeddings=256)),
    draft=("--seq-len", "64", "--batch-size", "4", "--max-steps", "2", "--eval-rows", "4",
           *arch(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, intermediate_size=32, max_position_embeddings=256)),
    ss_common=("--num-streams", "2", "--num-stream-layers", "1", "--top-k", "2",
               "--max-length", "32", "--batch-size", "4", "--max-steps", "2",
               "--eval-steps", "2", "--save-steps", "2"),
    ss_shared=("--mode", "shared", "--lora-rank", "4", "--lora-alpha", "8", "--save-adapter"),
    ss_lossless=("--mode", "lossless", "--stream-lora-rank", "2"),
    drafter_common=("--num-draft-tokens", "2", "--top-k", "2", "--max-length", "32",
                    "--batch-size", "4", "--max-steps", "2", "--eval-steps", "2",
                    "--save-steps", "2"),
    distill=(8, 4, ("--max-length", "32", "--window-prompt", "8", "--batch-size", "8")),
    lossless_on_distilled=True,
    control=True,
    drafters=True,
    eval_sample_files=4,
    quality_prompts=2,
    quality_max_tokens=8,
    tau_prompts=2,
    tau_max_tokens=8,
    convert=("--dtype", "bfloat16"),
    round_trip=True,
)
# fmt: on

RECIPES = {r.name: r for r in (STDLIB, CODE, CODE_CPU, SMOKE)}
