#!/usr/bin/env bash
# Issue #12's build (convert.build_default_model --recipe code) on the GPU machine, one
# device run per call. That machine keeps nothing between loans, takes 64 MiB in per run
# and gives back 8 files of 16 MB, so each run restores what earlier runs made, runs the
# build up to one stage, and brings back the items it made (convert.carry).
#
# There:  bash benchmarks/gpu_build.sh STAGES MINUTES ITEMS
#   STAGES   the stages to run, comma-separated, as the build names them (the corpus and its
#            held-out sample, which no machine keeps, are always added)
#   MINUTES  --time-limit of each training stage in this run
#   ITEMS    the items to bring back, comma-separated (convert.carry)
# Carry in (the run tool's `carry`, at most 8 paths and 64 MiB with the tree): the item
# folders the stages read, kept here as runs/carry/RUN/ITEM (after a run, copy its returned
# files here: cp -r FILES_AT/* runs/carry/runN/). Restoring is idempotent, so a
# warm machine keeps what earlier runs restored. Stages that convert or measure need MLX:
# run .gpu/bin/install.sh first (../shared/gpu/README.md).
#
# The plan (H100 throughput of ../shared/gpu/README.md; each run under 10 minutes; every run
# after the first also carries the latest `top`, whose corpus digest the rebuilt corpus must
# match). Runs 1-5 need PyTorch alone (tests/test_build.py imports them with MLX blocked):
#   1. "tokenizer" 1 top,tokenizer                                             carry: -
#      (corpus and tokenizer, about 2 minutes, so that the base gets a run of its own)
#   1b. "base model,base round trip" 8.5 top,base       carry: tokenizer (8.5 min x 652k
#      tokens/s = 332M tokens; on a warm machine right after run 1 nothing needs restoring)
#   2. "draft model,draft round trip,self-distilled train data,self-distilled eval data"
#      2 top,draft,distilled                                     carry: base, tokenizer
#   3. "shared-mode fine-tune" 7 top,ss-shared                    carry: base, tokenizer
#   4. "lossless-mode fine-tune,shared-mode control fine-tune" 4 top,ss-lossless,ss-control
#                                                      carry: base, tokenizer, distilled
#   5. "medusa drafter,parallelspec drafter" 4 top,medusa,parallelspec
#                                                      carry: base, tokenizer, distilled
#   then MLX's three install runs; the conversions, quality and choice.json in runs that
#   each carry the base and a few items (all of them exceed 64 MiB); then the speeds:
#   python3 benchmarks/compare_drafters.py --work runs/code --recipe code --dtype bfloat16
#   (and float32 with MLX_ENABLE_TF32=0), python3 -m mlx_specstream.benchmark --model
#   runs/code/mlx/lossless --draft-model runs/code/mlx/draft --prompts runs/code/prompts.jsonl
# A CPU dry run of the same plumbing: RECIPE=smoke BUILD_ARGS="--root stdlib:DIR" OUT=... .
set -euo pipefail
stages=${1:?"STAGES: the stages to run, comma-separated"}
minutes=${2:?"MINUTES: the time limit of each training stage"}
items=${3:?"ITEMS: what to bring back, e.g. top,base,tokenizer"}
out=${OUT:?"OUT: the folder whose files come back"}
recipe=${RECIPE:-code}
work=${WORK:-runs/$recipe}
carried=${CARRIED:-runs/carry}
python=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ -n "$(find "$carried" -name '*.carry.json' 2>/dev/null | head -1)" ]; then
  "$python" -m convert.carry restore "$carried" "$work"
fi
"$python" -m convert.build_default_model --recipe "$recipe" --work "$work" --no-tune \
  --only "corpus,held-out sample,$stages" --time-limit "$minutes" ${BUILD_ARGS:-}
"$python" -m convert.carry collect "$work" "$out" --items "$items"
ls -l "$out"/*
