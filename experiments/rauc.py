"""RAUC (MTO paper, Eq. 6): how much more area a method's accuracy curve has than a baseline's.

MTO paper: "Emerging Property of Masked Token for Effective Pre-training", Hyesong Choi et al.,
arXiv:2404.08330.

    python pretrain.py --config configs/fmnist_simmim.yaml     # eval_knn_every: 1 logs k-NN top-1
    python pretrain.py --config configs/fmnist_simmim_mto.yaml
    python experiments/rauc.py baseline=runs/fmnist_simmim/log.jsonl \
        method=runs/fmnist_simmim_mto/log.jsonl

Reads, from each JSON-lines log, the lines that have both "epoch" and `key` (default knn_top1,
which pretrain.py writes with eval_knn_every > 0; any per-epoch accuracy works, e.g. fine-tuning
top-1 of checkpoints kept every few epochs). A repeated epoch (a resumed run) counts once, the
last value. E1/E2 default to the first/last epoch both curves have. Prints both curves and
RAUC(S1, S2; E1, E2) = losses.rauc: 1 = no gain over the baseline, 1.47 = 47% more area.
Every RAUC printed here comes with CAVEAT: Eq. 6 as printed, applied to the paper's own Table 2
points, gives 2.36 / 2.09 / 3.31 / 2.09 where the paper prints 1.20 / 1.23 / 1.22 / 1.20, so the
paper's RAUC values are not on this scale (DECISIONS.md, "RAUC").
"""
import json
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import losses  # noqa: E402
from common import ConfigError, parse_config, run_main  # noqa: E402

CAVEAT = ("note: RAUC is Eq. 6 as printed; it is not comparable with the MTO paper's RAUC "
          "values (on the paper's own Table 2 points it gives 2.36 / 2.09 / 3.31 / 2.09 where "
          "the paper prints 1.20 / 1.23 / 1.22 / 1.20; see DECISIONS.md)")


@dataclass
class Config:
    baseline: str = ""                 # S1: the baseline run's log.jsonl
    method: str = ""                   # S2: the method's log.jsonl (e.g. + MTO)
    key: str = "knn_top1"              # the accuracy field of the log lines
    e1: float = -1.0                   # E1; < 0: the first epoch both curves have
    e2: float = -1.0                   # E2; < 0: the last epoch both curves have

    def validate(self):
        if not self.baseline or not self.method:
            raise ConfigError("give both logs: baseline=runs/A/log.jsonl method=runs/B/log.jsonl")


def read_curve(path: str, key: str) -> list:
    """A JSON-lines log -> [(epoch, value), ...] sorted by epoch, the last value of each epoch."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"log '{path}' does not exist")
    points = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if key in record and "epoch" in record:
                points[float(record["epoch"])] = float(record[key])
    if not points:
        raise ConfigError(f"'{path}' has no lines with 'epoch' and '{key}': pre-train with "
                          "eval_knn_every > 0 or give key=<your accuracy field>")
    return sorted(points.items())


def main(argv):
    cfg = parse_config(Config, argv)
    s1, s2 = read_curve(cfg.baseline, cfg.key), read_curve(cfg.method, cfg.key)
    e1 = cfg.e1 if cfg.e1 >= 0 else max(s1[0][0], s2[0][0])
    e2 = cfg.e2 if cfg.e2 >= 0 else min(s1[-1][0], s2[-1][0])
    try:
        value = losses.rauc(s1, s2, e1, e2)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for name, curve in (("S1 baseline", s1), ("S2 method", s2)):
        print(f"{name:>12}: " + ", ".join(f"{e:g}: {v:.4f}" for e, v in curve))
    print(f"RAUC(S1, S2; {e1:g}, {e2:g}) = {value:.4f}")
    print(CAVEAT)
    print(json.dumps({"baseline": cfg.baseline, "method": cfg.method, "key": cfg.key, "e1": e1,
                      "e2": e2, "rauc": value, "note": CAVEAT}))


if __name__ == "__main__":
    run_main(main)
