#!/usr/bin/env bash
# The small-scale study (budget: 100 min on a 2-core CPU; see experiments/README.md). Started again
# after an interruption it resumes: finished runs are skipped, unfinished ones continue from their
# checkpoint.
#   bash experiments/small_scale.sh                       # -> experiments/results.json, results.md, figures/
#   bash experiments/small_scale.sh --quick --out /tmp/ss # every stage once, tiny, about 1.5 min
set -euo pipefail
cd "$(dirname "$0")/.."
exec python experiments/small_scale.py "$@"
