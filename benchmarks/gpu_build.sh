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
# Between sessions nothing survives but the committed tree (runs/ is not committed, and a
# 32M base is too large to commit beside the package), and a session has 15 minutes of
# device time in all (machine start included). The build therefore spans sessions through
# the package itself: the first session ships the new default (base and lossless streams),
# and later ones restore the base from it (FROM_PACKAGE=1: convert.from_package writes
# base/ and tokenizer/ from mlx_specstream/models/default, without MLX) and train the rest;
# their MLX conversions then reuse the package's quantized tensors (convert --quantized-like).
# Sizes: benchmarks/results/package_budget-code-s60.md (a 4-bit base fits the 30 MB tree
# without a draft model, a 3-bit base with a 4-bit one). The plan (H100 throughput of
# ../shared/gpu/README.md; each call under 10 minutes; a warm machine keeps runs/ between
# the calls of one session):
#   session 1, call 1: "tokenizer,base model,base round trip" 6 top,tokenizer,base
#      (corpus and tokenizer about 1-2 minutes, then 6 min x 652k tokens/s = 235M tokens)
#   session 1, call 2: "self-distilled train data,self-distilled eval data,lossless-mode
#      fine-tune" 1 top,ss-lossless,distilled       (nothing to carry: the machine is warm;
#      MINUTES caps the distillation too, so the call takes about 3 minutes)
#   here: convert (the recipe's bits), quality, held-out prompts, tune, ship; commit
#   session 2: FROM_PACKAGE=1, "draft model,shared-mode fine-tune" 3 top,draft,ss-shared;
#      then "shared-mode control fine-tune" ... as the session's minutes allow
#   session 3: FROM_PACKAGE=1, "self-distilled train data,medusa drafter,parallelspec
#      drafter"; then MLX's install runs and the speeds:
#   python3 benchmarks/compare_drafters.py --work runs/code --recipe code --dtype bfloat16
#   (and float32 with MLX_ENABLE_TF32=0), python3 -m mlx_specstream.benchmark --model
#   runs/code/mlx/lossless --draft-model runs/code/mlx/draft --prompts runs/code/prompts.jsonl
# Items a session's later stages need that are not in the package (draft, distilled, an
# adapter) come back under $OUT and, where they must outlive the session, are committed
# only if the tree stays within 30 MB.
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

if [ "${FROM_PACKAGE:-0}" = 1 ] && [ ! -e "$work/base" ]; then  # (a warm machine has it)
  "$python" -m convert.from_package "${PACKAGE:-mlx_specstream/models/default}" "$work"
fi
if [ -n "$(find "$carried" -name '*.carry.json' 2>/dev/null | head -1)" ]; then
  "$python" -m convert.carry restore "$carried" "$work"
fi
"$python" -m convert.build_default_model --recipe "$recipe" --work "$work" --no-tune \
  --only "corpus,held-out sample,$stages" --time-limit "$minutes" ${BUILD_ARGS:-}
"$python" -m convert.carry collect "$work" "$out" --items "$items"
ls -l "$out"/*
