#!/usr/bin/env bash
# The GPU checks of issues #11 and #13, one or more stages per device run (each fits in 10
# minutes).
#
# Here, once: bash ../shared/gpu/prepare.sh (see ../shared/gpu/README.md). There, three runs
# back to back carrying .gpu/pN and .gpu/bin; the last one, and every later run on the same
# machine, is:
#     bash benchmarks/gpu_checks.sh STAGE [STAGE ...]
# STAGE: tests | step_cost | pipeline | verifier | fidelity | fidelity-8b | ngram | parity | tune |
# recurrent | batch | window. Stages run in the order given and each copies its results to $OUT (the run's
# return folder) as it ends, so a run stopped by its time limit still brings back the stages
# it finished.
# With 15 minutes of device time a session gets the install and about two stages: pipeline
# first (does launching step k + 1 before reading step k pay, and r(4)/r(16) both ways), then
# tune (the shipped model's tree for this GPU), step_cost (r(n) for n = 1..16 with the
# defaults), verifier (our loop against mlx-lm's on the same drafts), then tests, fidelity,
# ngram, parity, recurrent. So the third install run may well be:
#     bash benchmarks/gpu_checks.sh pipeline tune step_cost
# float32 equality needs full-precision matmuls, so TF32 is turned off for every stage.
set -euo pipefail
stages="tests | step_cost | pipeline | verifier | fidelity | fidelity-8b | ngram | parity | tune | recurrent | batch | window"
[ $# -ge 1 ] || { echo "stages: $stages" >&2; exit 2; }
for stage in "$@"; do
  case "$stage" in tests|step_cost|pipeline|verifier|fidelity|fidelity-8b|ngram|parity|tune|recurrent|batch|window) ;;
    *) echo "unknown stage: $stage (stages: $stages)" >&2; exit 2 ;;
  esac
done
out=${OUT:?"OUT: the folder whose files come back"}
bash .gpu/bin/install.sh
export MLX_ENABLE_TF32=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import mlx.core as mx; assert mx.default_device() == mx.gpu, mx.default_device()"
run_stage() {
  local stage=$1
  case "$stage" in
    tests)
      # scipy and openai are not installed there: the modules that need them are named here,
      # not skipped silently; run them on a machine that has both. (The chi-square tests of
      # test_ngram.py and test_recurrent.py import scipy inside the test: they show as skipped
      # in the log, and the rest of both modules runs.) The equality tests run
      # first, and each test's line goes straight to $OUT, so a run stopped by its time limit
      # (the suite takes 27 minutes in one process on 2 CPU cores) still brings back the tests
      # it finished. One process (-o addopts=): pytest-xdist is not installed there.
      local first="tests/test_lossless.py tests/test_cache_and_masks.py tests/test_near_tie.py
        tests/test_precision.py tests/test_kv_quant.py tests/test_ngram.py"
      local files
      files="$first $(ls tests/test_*.py | grep -vxF "$(printf '%s\n' $first \
        tests/test_sampling.py tests/test_server.py tests/test_tool_calls.py)")"
      python3 -m pytest -o addopts= -v $files --durations=20 -p no:cacheprovider \
        --junitxml="$out/gpu_tests.xml" > "$out/gpu_tests.log" 2>&1 || true
      tail -5 "$out/gpu_tests.log" ;;
    step_cost)
      python3 benchmarks/step_cost.py --models shipped,qwen2-0.5b,llama-8b --dtypes bf16,q4 \
        --stream-pass both --tag gpu
      cp benchmarks/results/step_cost-gpu.* "$out/" ;;
    pipeline)
      # The pipelined step against the unpipelined one and mlx-lm: r(4) and r(16) both ways.
      # Then the kernels each step launches, as the GPU builds them (a few seconds).
      python3 benchmarks/pipeline.py --models shipped,qwen2-0.5b,llama-8b --rounds 4 --tag gpu
      python3 benchmarks/step_graph.py --tag gpu
      cp benchmarks/results/pipeline-gpu.* benchmarks/results/step_graph-gpu.* "$out/" ;;
    fidelity)
      python3 benchmarks/fidelity.py --models qwen2-0.5b --dtypes f32,bf16,q4 \
        --prompts 16 --max-tokens 128 --tag gpu-0.5b
      cp benchmarks/results/fidelity-gpu-0.5b.* "$out/" ;;
    verifier)
      # Our verifier against mlx-lm's speculative loop on the same drafts (a copy of the
      # base drafts, every draft accepted by both): the loop's own cost, bf16 and 4-bit.
      python3 benchmarks/draft_verifier.py --models shipped,qwen2-0.5b,llama-8b \
        --dtypes bf16,q4 --tag gpu
      cp benchmarks/results/draft_verifier-gpu.* "$out/" ;;
    fidelity-8b)
      python3 benchmarks/fidelity.py --models llama-8b --dtypes bf16,q4 \
        --prompts 8 --max-tokens 128 --tag gpu-8b
      cp benchmarks/results/fidelity-gpu-8b.* "$out/" ;;
    recurrent)
      # A prompt-lookup step on a hybrid model (Gated DeltaNet + attention), bf16 and 4-bit:
      # r(n) against mlx-lm's per-token time, and the split mixers' cost o(n) (a minute).
      python3 benchmarks/recurrent_step.py --models qwen3_next-0.6b --dtypes bf16,q4 --tag gpu
      cp benchmarks/results/recurrent_step-gpu.* "$out/" ;;
    ngram)
      # Prompt lookup's speed, its lookup on long contexts, and a chain verified by the
      # plain pass against the same chain verified as a tree (fewer kernels per step).
      python3 benchmarks/ngram_speed.py --prompts 4 --prompt-tokens 96 --max-tokens 96 --tag gpu
      python3 benchmarks/ngram_context.py --tag gpu
      python3 benchmarks/chain_pass.py --tag gpu
      cp benchmarks/results/ngram_speed-gpu.* benchmarks/results/ngram_context-gpu.* \
        benchmarks/results/chain_pass-gpu.* "$out/" ;;
    parity)
      # Issue #13: MLX stream training against the PyTorch recipe at a GPU budget (both
      # trainers on the GPU: transformers' Trainer on CUDA, MLX on its CUDA backend).
      python3 benchmarks/train_parity.py --work runs/train_parity_gpu --iters 1000 \
        --batch-size 32 --max-examples 8000 --distill-batch-size 128 --name train_parity-gpu
      cp benchmarks/results/train_parity-gpu.* "$out/" ;;
    batch)
      # Batches whose rows speculate (streams fused and split, lookup, draft model) against
      # mlx-lm's batch_generate and its one-at-a-time loops, K = 1..16 (a few minutes).
      python3 benchmarks/batch_speed.py --batch 1,4,16 --draft-tokens 2 --rounds 2 --tag gpu
      # Lookup and draft-model rows pipelined (drafts on the device) against unpipelined:
      # the default pipelines them on a GPU only, unmeasured there.
      python3 benchmarks/batch_speed.py --batch 1,4,16 --draft-tokens 2,4 --rounds 2 \
        --ways "lookup 2,lookup 4,draft model" --pipeline-ab --tag gpu-lookup
      cp benchmarks/results/batch_speed-gpu.* benchmarks/results/batch_speed-gpu-lookup.* "$out/" ;;
    window)
      # A sliding-window model (Gemma 3 270M's shape, bf16) past its window: ours against
      # mlx-lm plain and draft-model decoding, identity and KV memory (a few minutes).
      python3 benchmarks/sliding_window.py --shape gemma3-270m --dtype bf16 \
        --prompt-tokens 2048 --max-tokens 128 --rounds 2 --tag gpu
      cp benchmarks/results/sliding_window-gpu.* "$out/" ;;
    tune)
      # The shipped model's tree for this GPU, stored under its name in the config's "tuned"
      # (other devices keep theirs): commit the returned config.json into the package.
      # --batch-size 8: also how the server's batches of 8 draft there (the config's "batch").
      python3 -m mlx_specstream.tune --save --num-prompts 4 --batch-size 8 2>&1 \
        | tee "$out/tune-gpu.log"
      cp mlx_specstream/models/default/config.json "$out/config.json" ;;
  esac
}
for stage in "$@"; do
  echo "== stage $stage ($(date -u +%T))"
  SECONDS=0
  run_stage "$stage"
  echo "== stage $stage took $SECONDS s"
done
