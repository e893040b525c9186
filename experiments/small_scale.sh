#!/usr/bin/env bash
# The small-scale experiments of issue 9 (about 70 min on a 2-core CPU). Started again after an
# interruption it resumes: finished runs are skipped, unfinished ones continue from their checkpoint.
#   bash experiments/small_scale.sh                       # -> experiments/results.json, results.md, figures/
#   bash experiments/small_scale.sh --quick --out /tmp/ss # one tiny row end to end, a few minutes
set -euo pipefail
cd "$(dirname "$0")/.."
exec python experiments/small_scale.py "$@"
