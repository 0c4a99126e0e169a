#!/usr/bin/env bash
# The GPU checks of issues #11 and #13, one or more stages per device run (each fits in 10
# minutes).
#
# Here, once: PART_MB=37 bash ../shared/gpu/prepare.sh (see ../shared/gpu/README.md): two
# parts of 37 MiB, each travelling with the tracked tree (22 MB) under the 64 MiB a run takes.
# There, two runs in one message, carrying .gpu/p1 and .gpu/bin, then .gpu/p2 and .gpu/bin; the
# second, and every later run on the same machine, is:
#     bash .gpu/bin/install.sh && bash benchmarks/gpu_checks.sh STAGE[:SECONDS] ...
# STAGE: cold | phases | tests | step_cost | pipeline | verifier | fidelity | fidelity-8b | ngram | parity |
# tune | benchmark | recurrent | batch | batch_mtp | window | mtp | mtp_step | medusa_step.
# Stages run in the order given.
# GPU_DEADLINE=SECONDS (default 540) bounds the whole run: each stage is stopped when it is
# reached, or after its own SECONDS when given as STAGE:SECONDS. Everything comes back as two
# files, so a stopped stage costs only its own results: $OUT/gpu.log (every stage's output)
# and $OUT/results.tgz (each result file the stages wrote, the tuned config.json and the test
# logs), rewritten after every stage.
#
# Session 33 (15 minutes of device time: machine start, install, one 9-minute run) ran
# step_cost:180 pipeline:100 tune:80 benchmark:50 tests: a step met for the first time with a
# cache length costs 25-58 ms there, the same step repeated 3 ms (benchmarks/RESULTS.md,
# "The first GPU run"). So the next session's run starts with `cold` (two minutes: which
# operation carries that cost, and whether 256-column buckets cure it), e.g.
#     GPU_DEADLINE=500 bash benchmarks/gpu_checks.sh cold:150 phases:90 step_cost:150 pipeline:80 tests
# (`phases` then says which part of a warm step costs the device time that session 33's warm
# steps spent beyond their kernel count: r = 1.8-2.2 plain tokens for 1.15-1.3x the kernels.)
# float32 equality needs full-precision matmuls, so TF32 is turned off for every stage.
set -euo pipefail
stages="cold | phases | tests | step_cost | pipeline | verifier | fidelity | fidelity-8b | ngram | parity | tune | benchmark | recurrent | batch | batch_mtp | window | mtp | mtp_step | medusa_step"
[ $# -ge 1 ] || { echo "stages: $stages" >&2; exit 2; }
for arg in "$@"; do
  case "${arg%%:*}" in cold|phases|tests|step_cost|pipeline|verifier|fidelity|fidelity-8b|ngram|parity|tune|benchmark|recurrent|batch|batch_mtp|window|mtp|mtp_step|medusa_step) ;;
    *) echo "unknown stage: ${arg%%:*} (stages: $stages)" >&2; exit 2 ;;
  esac
done
returned=${OUT:?"OUT: the folder whose files come back"}
deadline=${GPU_DEADLINE:-540}
exec > >(tee -a "$returned/gpu.log") 2>&1
out=$(mktemp -d)  # stage files beside the results; all tarred into $returned after each stage
marker=$(mktemp); sleep 1
bash .gpu/bin/install.sh
export PYTHONUNBUFFERED=1 MLX_ENABLE_TF32=0 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import mlx.core as mx; assert mx.default_device() == mx.gpu, mx.default_device()"
run_stage() {
  local stage=$1
  case "$stage" in
    cold)
      # A first pass at a new cache length against the same pass again: primitives (with and
      # without CUDA graphs, with and without cuDNN's attention) and whole generations of the
      # shipped model, a 0.5B shape and gpt-oss's windowed layout, with and without buckets
      # (about two minutes).
      python3 benchmarks/cold_shapes.py --no-graphs --no-cudnn \
        --models shipped,qwen2-0.5b,gpt_oss-small --max-tokens 32 --tag gpu ;;
    phases)
      # One warm step's phases, each evaluated alone, with the host's share (graph building)
      # apart: the pass against plain passes over 1 and n tokens, acceptance, draft, commit.
      for tree in chain3 k3x3-16; do
        python3 benchmarks/step_phases.py --shape qwen2-0.5b --dtype bfloat16 --tree $tree \
          --reps 20 --tag gpu-0.5b-$tree
      done
      python3 benchmarks/step_phases.py --dtype bfloat16 --tree chain3 --reps 20 \
        --tag gpu-shipped-chain3
      python3 benchmarks/step_phases.py --shape llama-8b --dtype bfloat16 --tree chain3 \
        --reps 10 --tag gpu-8b-chain3 ;;
    tests)
      # The whole suite but the two modules that drive the server with the openai client,
      # which is not installed there (named here, not skipped silently; run them on a machine
      # that has it). pytest-xdist is installed there (session 33's log: xdist-3.8.0): one
      # file per worker, GPU_TEST_WORKERS (default 8) processes sharing the GPU; the suite is
      # about 2,000 s of one CPU core here. The equality tests' files go out first, and the
      # log is tarred into $OUT after the stage, so a run stopped by its deadline still
      # brings back every test it finished (the junit XML only when the suite ends).
      local first="tests/test_lossless.py tests/test_cache_and_masks.py tests/test_near_tie.py
        tests/test_precision.py tests/test_kv_quant.py tests/test_ngram.py tests/test_sampling.py"
      local files
      files="$first $(ls tests/test_*.py | grep -vxF "$(printf '%s\n' $first \
        tests/test_server.py tests/test_tool_calls.py)")"
      python3 -m pytest -o addopts= -n "${GPU_TEST_WORKERS:-8}" --dist loadfile -v $files \
        --durations=20 -p no:cacheprovider --junitxml="$out/gpu_tests.xml" \
        > "$out/gpu_tests.log" 2>&1 || true
      tail -5 "$out/gpu_tests.log" ;;
    step_cost)
      # Real shapes first, the fused pass (a GPU's default): session 33's 180 s reached only
      # the shipped model and the 0.5B shape in bf16 with both passes.
      python3 benchmarks/step_cost.py --models qwen2-0.5b,llama-8b,shipped,llama-3b \
        --dtypes bf16,q4 --stream-pass fused --tag gpu ;;
    pipeline)
      # The pipelined step against the unpipelined one and mlx-lm: r(4) and r(16) both ways.
      # Then the kernels each step launches, as the GPU builds them (a few seconds).
      python3 benchmarks/pipeline.py --models shipped,qwen2-0.5b,llama-8b --rounds 4 --tag gpu
      python3 benchmarks/step_graph.py --tag gpu ;;
    fidelity)
      python3 benchmarks/fidelity.py --models qwen2-0.5b --dtypes f32,bf16,q4 \
        --prompts 16 --max-tokens 128 --tag gpu-0.5b ;;
    verifier)
      # Our verifier against mlx-lm's speculative loop on the same drafts (a copy of the
      # base drafts, every draft accepted by both): the loop's own cost, bf16 and 4-bit.
      python3 benchmarks/draft_verifier.py --models shipped,qwen2-0.5b,llama-8b \
        --dtypes bf16,q4 --tag gpu ;;
    fidelity-8b)
      python3 benchmarks/fidelity.py --models llama-8b --dtypes bf16,q4 \
        --prompts 8 --max-tokens 128 --tag gpu-8b ;;
    recurrent)
      # A prompt-lookup step on a hybrid model (Gated DeltaNet + attention), bf16 and 4-bit:
      # r(n) against mlx-lm's per-token time, and the split mixers' cost o(n) (a minute).
      python3 benchmarks/recurrent_step.py --models qwen3_next-0.6b --dtypes bf16,q4 --tag gpu ;;
    ngram)
      # Prompt lookup's speed, its lookup on long contexts, and a chain verified by the
      # plain pass against the same chain verified as a tree (fewer kernels per step).
      python3 benchmarks/ngram_speed.py --prompts 4 --prompt-tokens 96 --max-tokens 96 --tag gpu
      python3 benchmarks/ngram_context.py --tag gpu
      python3 benchmarks/chain_pass.py --tag gpu ;;
    parity)
      # Issue #13: MLX stream training against the PyTorch recipe at a GPU budget (both
      # trainers on the GPU: transformers' Trainer on CUDA, MLX on its CUDA backend).
      python3 benchmarks/train_parity.py --work runs/train_parity_gpu --iters 1000 \
        --batch-size 32 --max-examples 8000 --distill-batch-size 128 --name train_parity-gpu ;;
    batch)
      # Batches whose rows speculate (streams fused and split, lookup, draft model) against
      # mlx-lm's batch_generate and its one-at-a-time loops, K = 1..16 (a few minutes).
      python3 benchmarks/batch_speed.py --batch 1,4,16 --draft-tokens 2 --rounds 2 --tag gpu
      # Lookup and draft-model rows pipelined (drafts on the device) against unpipelined:
      # the default pipelines them on a GPU only, unmeasured there.
      python3 benchmarks/batch_speed.py --batch 1,4,16 --draft-tokens 2,4 --rounds 2 \
        --ways "lookup 2,lookup 4,draft model" --pipeline-ab --tag gpu-lookup ;;
    batch_mtp)
      # A batch's rows drafting with three trained MTP layers, and with the first alone
      # (sessions 43-45): pipelined (the layers' rows fed and drafted on the device, the
      # GPU's default, unmeasured there) against unpipelined, and against mlx-lm's
      # batch_generate. The checkpoint (the shipped base as MiMo, its layers trained on
      # self-distilled stdlib windows) is built there first: on this CPU the windows take
      # 4 minutes and the 1,000 steps about 50; its work folder stays out of what comes back.
      local work; work="$(mktemp -d)/mtp"
      python3 benchmarks/mtp_trained.py --work "$work" --depths 3 --skip-benchmark \
        --tag gpu-build-d3
      (cd benchmarks && python3 batch_speed.py --model "$work/ckpt-d3" --batch 1,4,16 \
        --draft-tokens 2 --rounds 2 --ways "streams,lookup 2" --pipeline-ab --tag gpu-mtp-d3) ;;
    window)
      # A sliding-window model (Gemma 3 270M's shape, bf16) past its window: ours against
      # mlx-lm plain and draft-model decoding, identity and KV memory (a few minutes).
      python3 benchmarks/sliding_window.py --shape gemma3-270m --dtype bf16 \
        --prompt-tokens 2048 --max-tokens 128 --rounds 2 --tag gpu ;;
    mtp)
      # A checkpoint's own MTP layer (session 36): the shipped base as a MiMo checkpoint, its
      # MTP layer trained there (1,000 steps; 15 minutes on the 2-core CPU), tau of chains
      # of 1-3 and mlx_specstream.benchmark against mlx-lm plain and draft-model decoding.
      # (its work folder, corpus and checkpoints, stays out of what comes back)
      python3 benchmarks/mtp_trained.py --work "$(mktemp -d)/mtp" --tag gpu ;;
    mtp_step)
      # An MTP layer drafting chains on a hybrid (session 37: Qwen3-Next's layout at the 0.6B
      # shape), bf16 and 4-bit: r(n) of chains of 1-3 against mlx-lm's per-token time, and
      # the drafting's share of a step (each level reads the LM head again; a minute or two).
      (cd benchmarks && python3 mtp_step.py --models qwen3_next-0.6b --dtypes bf16,q4 \
        --max-tokens 64 --runs 3 --tag gpu) ;;
    medusa_step)
      # Medusa heads (session 51): heads sharing the base's LM head against released ones
      # (an LM head of their own each), and those ranking a 32,768-token draft vocabulary,
      # at the 0.5B and 8B shapes in bf16 and 4-bit (the heads quantized as the base: not
      # measurable on the CPU, whose quantized products are slower than float ones).
      (cd benchmarks && python3 medusa_step.py --models qwen2-0.5b,llama-8b --dtypes bf16,q4 \
        --max-tokens 48 --runs 3 --tag gpu) ;;
    tune)
      # The shipped model's tree for this GPU, stored under its name in the config's "tuned"
      # (other devices keep theirs): commit the returned config.json into the package.
      # --batch-size 8: also how the server's batches of 8 draft there (the config's "batch").
      python3 -m mlx_specstream.tune --save --num-prompts 4 --batch-size 8 2>&1 \
        | tee "$out/tune-gpu.log"
      cp mlx_specstream/models/default/config.json "$out/config.json" ;;
    benchmark)
      # The headline: the shipped model (its tuned tree, when tune ran first) against mlx-lm
      # plain and draft-model decoding on the same weights, in the same run.
      python3 -m mlx_specstream.benchmark --name benchmark-gpu ;;
  esac
}
export -f run_stage; export out
start=$SECONDS
for arg in "$@"; do
  stage=${arg%%:*}
  left=$((deadline - (SECONDS - start)))
  [ "$stage" = "$arg" ] || left=$(( ${arg#*:} < left ? ${arg#*:} : left ))
  [ "$left" -gt 10 ] || { echo "== stage $stage not run: the deadline (${deadline} s) is reached"; continue; }
  echo "== stage $stage ($(date -u +%T), ${left} s left)"
  t0=$SECONDS
  timeout -k 5 "$left" bash -c 'run_stage "$1"' _ "$stage" || echo "== stage $stage exited $?"
  echo "== stage $stage took $((SECONDS - t0)) s"
  find benchmarks/results -type f -newer "$marker" -exec cp {} "$out/" \;
  tar czf "$returned/results.tgz" -C "$out" .
done
