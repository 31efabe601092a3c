#!/usr/bin/env bash
# GPU benchmark: WRN-28-10 and ResNet-18 at batch 128, float32 and bfloat16, SGD / SAM / VaSSO:
# images/s, step-time ratios to SGD, memory. Synthetic CIFAR-shaped data: nothing to download.
# Sized to finish in under 6 minutes on one H200, compilation included (not measured yet:
# no GPU was available when it was written); prints a markdown table.
#
#   experiments/benchmarks/gpu.sh                          # print the table
#   experiments/benchmarks/gpu.sh --output BENCHMARKS.md   # also write it into BENCHMARKS.md
#   experiments/benchmarks/gpu.sh --tiny                   # the CPU path at tiny size (tests)
#
# Flags are those of `python -m experiments.benchmarks.gpu --help`. PYTHON overrides the
# interpreter (default: the repository's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m experiments.benchmarks.gpu "$@"
