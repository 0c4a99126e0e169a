#!/usr/bin/env bash
# Runs a command with Debian's OpenBLAS interposed under MLX's CPU backend.
#
# The mlx-cpu wheel for Linux bundles reference netlib BLAS, so float32 GEMM
# runs at a few GFLOP/s and verifying n tokens costs about n times one token.
# libmlx resolves cblas_sgemm dynamically, so preloading OpenBLAS replaces it
# for every model in the process (mlx-lm's and ours alike). This is symbol
# interposition, not an upstream-supported setup: use it for measurements,
# and report which BLAS a figure was taken with.
#
#   benchmarks/with_openblas.sh python -m mlx_specstream.benchmark ...
set -euo pipefail
cache="${OPENBLAS_CACHE:-$HOME/.cache/mlx-specstream/openblas}"
lib="$cache/usr/lib/x86_64-linux-gnu"
if [ ! -e "$lib/openblas-pthread/libblas.so.3" ]; then
    mkdir -p "$cache/debs"
    (cd "$cache/debs" && apt-get download libopenblas0-pthread libgfortran5 >/dev/null)
    for deb in "$cache"/debs/*.deb; do dpkg-deb -x "$deb" "$cache"; done
fi
export LD_LIBRARY_PATH="$lib/openblas-pthread:$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_PRELOAD="$lib/openblas-pthread/libblas.so.3"
exec "$@"
