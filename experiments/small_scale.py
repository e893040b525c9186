"""Small-scale evidence on Fashion-MNIST: DTM vs token-wise distillation, SimMIM / MAE with and
without MTO, Beyond-[cls] probes of every encoder, and what each costs. One driver, every row.

    bash experiments/small_scale.sh                          # the full run (~70 min, 2-core CPU)
    python experiments/small_scale.py --quick --out /tmp/ss  # one tiny row end to end, a few min

Every run is the project's own script as a subprocess, `python <script> --config
configs/X.yaml key=value ...`, in its own folder OUT/runs/<name>/ (stdout.log, log.jsonl,
checkpoints, run.json):
  teacher        finetune.py init="" (supervised, from scratch), saved as an encoder file
  dtm, tokenwise pretrain.py fmnist_dtm.yaml teacher=checkpoint (that teacher) loss=dtm | tokenwise
  simmim(_mto)   pretrain.py fmnist_simmim(_mto).yaml, k-NN after every epoch
  mae(_mto)      pretrain.py fmnist_mae(_mto).yaml, k-NN after every epoch
  <run>/probe    probe.py fmnist_probe.yaml on the run's encoder: [cls], mean, AbMILP heads, k-NN
Started again, the driver skips finished runs (run.json says so and the final file exists) and
the scripts resume unfinished ones from their checkpoint.pth. Then it measures H^l per layer
(experiments/heterogeneity.py), RAUC of MTO over its baseline (losses.rauc), images/s, and
writes OUT/results.json, OUT/results.md (the tables and a suggested verdict per claim) and
OUT/figures/*.png (experiments/figures.py).
"""
import argparse
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "experiments")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import figures  # noqa: E402
import heterogeneity  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
import rauc as rauc_tool  # noqa: E402
from common import load_checkpoint, save_atomic  # noqa: E402


# -----------------------------------------------------------------------------
# Settings: the full run and --quick

@dataclass
class Plan:
    model: str = "vit_mini"            # every encoder, teacher included (model.VIT_SIZES)
    seeds: Tuple[int, ...] = (0, 1)    # pre-training (and probe) seeds per variant
    variants: Tuple[str, ...] = ("dtm", "tokenwise", "simmim", "simmim_mto", "mae", "mae_mto")
    subset: int = 5000                 # pre-training images (the first of the training split)
    epochs: int = 5                    # pre-training epochs (k-NN after each: the RAUC curve)
    knn_bank: int = 2000               # k-NN during pre-training: training images in the bank ...
    knn_val: int = 1000                # ... and test images scored
    teacher_subset: int = 20000        # the supervised teacher, from scratch: training images ...
    teacher_epochs: int = 3            # ... and epochs
    # fmnist_finetune.yaml's Table-13 regularisation is meant for 100 epochs: in 4 epochs it held
    # the teacher near 30% top-1 (README); layer-wise lr decay is for pre-trained layers
    teacher_overrides: Tuple[str, ...] = ("batch_size=64", "blr=4e-3", "layer_decay=1.0",
                                          "mixup=0.0", "cutmix=0.0", "randaug_ops=0",
                                          "reprob=0.0")
    probe_subset: int = 5000           # probe.py: training images (= the pre-training images)
    probe_val: int = 0                 # test images (0 = all 10,000)
    probe_epochs: int = 10             # head training epochs on the cached frozen tokens
    probe_warmup: int = 1
    probe_teacher: bool = True         # also probe the teacher (a supervised reference)
    num_workers: int = 2               # loader processes of every script
    het_images: int = 256              # test images for H^l (each with its run's own mask)
    fig_images: int = 6                # images in the picture figures
    final_knn: bool = True             # false: skip the configs' final k-NN on all test images


QUICK = Plan(model="vit_micro", seeds=(0,), variants=("dtm", "simmim", "simmim_mto"), subset=256,
             epochs=1, knn_bank=256, knn_val=200, teacher_subset=256, teacher_epochs=1,
             probe_subset=256, probe_val=200, probe_epochs=1, probe_warmup=0, probe_teacher=False,
             num_workers=0, het_images=32, fig_images=3, final_knn=False)

VARIANTS = {  # name -> (config, overrides, row)
    "dtm": ("configs/fmnist_dtm.yaml", ["loss=dtm"], "distill"),
    "tokenwise": ("configs/fmnist_dtm.yaml", ["loss=tokenwise"], "distill"),
    "simmim": ("configs/fmnist_simmim.yaml", [], "simmim"),
    "simmim_mto": ("configs/fmnist_simmim_mto.yaml", [], "simmim"),
    "mae": ("configs/fmnist_mae.yaml", [], "mae"),
    "mae_mto": ("configs/fmnist_mae_mto.yaml", [], "mae"),
}
HEADS = ("cls", "mean", "abmilp", "knn_cls", "knn_mean")  # probe.py's results, in table order


@dataclass
class Run:
    name: str                          # folder name under OUT/runs (probes: <run>/probe)
    script: str                        # pretrain.py | finetune.py | probe.py
    args: List[str]                    # --config FILE key=value ... (out_dir included)
    out_dir: str
    final: str                         # the file only a finished run has
    meta: dict = field(default_factory=dict)  # variant, seed, row


# -----------------------------------------------------------------------------
# The runs

def rel(path: str) -> str:
    """Paths inside the repository are written relative to it (results.json stays portable)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def teacher_run(plan: Plan, runs: str) -> Run:
    """The distillation teacher: a supervised ViT trained from scratch by finetune.py (init="")."""
    out = os.path.join(runs, "teacher")
    args = ["--config", "configs/fmnist_finetune.yaml", "init=", f"model={plan.model}",
            *plan.teacher_overrides, f"subset={plan.teacher_subset}",
            f"epochs={plan.teacher_epochs}", "warmup_epochs=1", "seed=0",
            f"num_workers={plan.num_workers}", f"out_dir={rel(out)}"]
    return Run("teacher", "finetune.py", args, out, "model_timm.pth", {"row": "teacher"})


def pretrain_run(plan: Plan, runs: str, variant: str, seed: int, teacher_encoder: str) -> Run:
    config, extra, row = VARIANTS[variant]
    out = os.path.join(runs, f"{variant}-s{seed}")
    args = ["--config", config, *extra, f"model={plan.model}", f"subset={plan.subset}",
            f"epochs={plan.epochs}", f"seed={seed}", "eval_knn_every=1",
            f"knn_bank={plan.knn_bank}", f"knn_val={plan.knn_val}",
            f"num_workers={plan.num_workers}", f"out_dir={rel(out)}"]
    if row == "distill":
        args += ["teacher=checkpoint", f"teacher_pretrained={rel(teacher_encoder)}"]
    if not plan.final_knn:  # only then: the full run's arguments (run.json) stay as they were
        args.append("final_knn=false")
    return Run(f"{variant}-s{seed}", "pretrain.py", args, out, "encoder.pth",
               {"variant": variant, "seed": seed, "row": row})


def probe_run(plan: Plan, encoder: str, parent: Run) -> Run:
    out = os.path.join(parent.out_dir, "probe")
    # heads and baselines: the study's table (re-run with baselines: to do)
    args = ["--config", "configs/fmnist_probe.yaml", f"backbone={rel(encoder)}",
            f"subset={plan.probe_subset}", f"val_subset={plan.probe_val}",
            f"epochs={plan.probe_epochs}", f"warmup_epochs={plan.probe_warmup}",
            f"seed={parent.meta.get('seed', 0)}", f"num_workers={plan.num_workers}",
            f"out_dir={rel(out)}", "heads=[cls,mean,abmilp]", "baselines=false"]
    return Run(f"{parent.name}/probe", "probe.py", args, out, "results.json", dict(parent.meta))


def read_json(path: str, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(obj, path: str):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def execute(cmd: List[str], log_path: str) -> int:
    """Run one script, output appended to its log. Ctrl-C / SIGTERM: the script gets one SIGINT
    (pretrain.py then checkpoints and exits; the next start resumes), the driver stops."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
        try:
            return p.wait()
        except KeyboardInterrupt:
            p.send_signal(signal.SIGINT)
            print(f"\ninterrupted: waiting for {cmd[1]} to save a checkpoint", flush=True)
            p.wait(timeout=600)
            raise


def launch(run: Run, index: int, total: int) -> dict:
    """Run it unless it finished before; -> its run.json {args, finished, wall_s}."""
    os.makedirs(run.out_dir, exist_ok=True)
    info_path = os.path.join(run.out_dir, "run.json")
    info = read_json(info_path, {})
    if info and info.get("args") != run.args:
        made_by = " ".join(info.get("args", []))
        sys.exit(f"error: {rel(run.out_dir)} was made by other settings ({made_by}); "
                 "delete it or give the same settings")
    if info.get("finished") and os.path.isfile(os.path.join(run.out_dir, run.final)):
        print(f"[{index}/{total}] {run.name}: finished before, skipped", flush=True)
        return info
    info = {"args": run.args, "finished": False, "wall_s": info.get("wall_s", 0.0), **run.meta}
    write_json(info, info_path)
    log_path = os.path.join(run.out_dir, "stdout.log")
    print(f"[{index}/{total}] {run.name}: python {run.script} {' '.join(run.args)}\n"
          f"    log: {rel(log_path)}", flush=True)
    t0 = time.time()
    try:
        code = execute([sys.executable, run.script, *run.args], log_path)
    finally:
        info["wall_s"] += time.time() - t0
        write_json(info, info_path)
    if code != 0:
        with open(log_path) as f:
            tail = f.read().replace("\r", "\n").splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        sys.exit(f"error: {run.name} failed (exit {code}); its log is {rel(log_path)}")
    info["finished"] = True
    write_json(info, info_path)
    print(f"    done in {time.time() - t0:.0f} s", flush=True)
    return info


def teacher_encoder(finetune_dir: str) -> str:
    """finetune.py's final weights (checkpoint.pth: 'model' + 'vit_config', with the classifier)
    -> an encoder file {'config', 'model'} without the head, which pretrain.py's
    teacher=checkpoint reads (with the head, the ViT would return logits instead of patch tokens).
    The last epoch's weights, not best.pth: that one is chosen on the test set."""
    ckpt = load_checkpoint(os.path.join(finetune_dir, "checkpoint.pth"))
    config = dict(ckpt["vit_config"], num_classes=0, drop_path=0.0)
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    path = os.path.join(finetune_dir, "encoder.pth")
    save_atomic({"config": config, "model": state}, path)
    M.load_encoder(path)  # strict load: fails here, not in the distillation runs
    return path


# -----------------------------------------------------------------------------
# Measurements from the run folders

def read_log(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_speed(log: list) -> float:
    """Training images/s: the median over the log lines (robust to the first line of each epoch,
    which includes starting the loader, and to other work on the machine)."""
    values = [r["img_per_s"] for r in log if "img_per_s" in r]
    return statistics.median(values) if values else None


def knn_curve(out_dir: str) -> list:
    """[(epoch, k-NN top-1 in %)] from pretrain.py's log (experiments/rauc.py's reader)."""
    curve = rauc_tool.read_curve(os.path.join(out_dir, "log.jsonl"), "knn_top1")
    return [(e, 100.0 * v) for e, v in curve]


def measure_heterogeneity(run_dir: str, plan: Plan) -> dict:
    """H^l per layer over plan.het_images test images with the run's own masks."""
    cfg = heterogeneity.Config(checkpoints=[run_dir], num_images=plan.het_images)
    checkpoint = os.path.join(run_dir, "checkpoint.pth")
    curve, log_visible, note = heterogeneity.run_heterogeneity(checkpoint, cfg)
    return {"mean": curve.mean(1).tolist(), "std": curve.std(1).tolist(),
            "log_visible": log_visible, "images": curve.shape[1], "note": note}


def run_record(run: Run, info: dict, probe: Run, probe_info: dict, plan: Plan) -> dict:
    """Everything measured about one pre-training (or the teacher) run and its probe."""
    log = read_log(os.path.join(run.out_dir, "log.jsonl"))
    command = f"python {run.script} " + " ".join(run.args)
    rec = {**run.meta, "name": run.name, "out_dir": rel(run.out_dir), "command": command,
           "wall_s": info.get("wall_s"), "img_per_s": train_speed(log)}
    if run.script == "pretrain.py":
        rec["encoder"] = rel(os.path.join(run.out_dir, "encoder.pth"))
        rec["knn_curve"] = knn_curve(run.out_dir)
        rec["knn_final"] = rec["knn_curve"][-1][1]
        if run.meta["row"] in ("simmim", "mae"):
            rec["heterogeneity"] = measure_heterogeneity(run.out_dir, plan)
    if probe is not None:
        res = read_json(os.path.join(probe.out_dir, "results.json"))
        rec["probe"] = {"accuracy": res["accuracy"],
                        "heads": rel(os.path.join(probe.out_dir, "heads.pth")),
                        "path": res["protocol"]["path"], "features": res["protocol"]["features"],
                        "wall_s": probe_info.get("wall_s")}
    return rec


# -----------------------------------------------------------------------------
# Summaries: mean and spread over seeds, RAUC, cost ratios, claims

def summary(values: list) -> dict:
    """mean, spread = max - min over seeds (the table shows mean +- spread / 2), and the values."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "spread": None, "values": []}
    return {"mean": sum(values) / len(values), "spread": max(values) - min(values),
            "values": values}


def metric(rec: dict, key: str):
    """One number of a run: probe:<head>, knn_final, img_per_s, het_drop (H^0 - H^L), het0,
    hetL."""
    if key.startswith("probe:"):
        return rec.get("probe", {}).get("accuracy", {}).get(key[6:])
    if key.startswith("het"):
        h = rec.get("heterogeneity", {}).get("mean")
        return None if not h else {"het_drop": h[0] - h[-1], "het0": h[0], "hetL": h[-1]}[key]
    return rec.get(key)


def by_variant(records: dict, variant: str) -> list:
    runs = [r for r in records.values() if r.get("variant") == variant]
    return sorted(runs, key=lambda r: r["seed"])


def variant_table(records: dict, variants) -> dict:
    keys = ["knn_final", "img_per_s", "het0", "hetL", "het_drop", *(f"probe:{h}" for h in HEADS)]
    return {v: {k: summary([metric(r, k) for r in by_variant(records, v)]) for k in keys}
            for v in variants if by_variant(records, v)}


def rauc_of(records: dict, base: str, method: str) -> dict:
    """RAUC (MTO Eq. 6, losses.rauc) of the method's k-NN curve over the baseline's, per seed and
    for the seed-mean curves; "undefined" where the baseline never rises (or there is one
    epoch)."""
    def one(s1, s2):
        try:
            return losses.rauc(s1, s2, max(s1[0][0], s2[0][0]), min(s1[-1][0], s2[-1][0]))
        except ValueError as e:
            return f"undefined ({e})"
    pairs = [(b["knn_curve"], m["knn_curve"])
             for b in by_variant(records, base) for m in by_variant(records, method)
             if b["seed"] == m["seed"]]

    def mean_curve(cs):
        return [(e, sum(dict(c)[e] for c in cs) / len(cs)) for e, _ in cs[0]]
    out = {"per_seed": [one(s1, s2) for s1, s2 in pairs]}
    if pairs:
        base_mean = mean_curve([p[0] for p in pairs])
        method_mean = mean_curve([p[1] for p in pairs])
        out["seed_mean_curves"] = one(base_mean, method_mean)
    else:
        out["seed_mean_curves"] = "undefined (no runs)"
    return out


def cost_ratio(records: dict, base: str, method: str) -> dict:
    """Time per image of `method` over `base` (= base img/s / method img/s), per seed."""
    ratios = [b["img_per_s"] / m["img_per_s"]
              for b in by_variant(records, base) for m in by_variant(records, method)
              if b["seed"] == m["seed"] and b["img_per_s"] and m["img_per_s"]]
    return summary(ratios)


def verdict(diff, spread, n: int) -> str:
    if diff is None:
        return "not run"
    if n < 2:
        return "inconclusive (one seed)"
    if abs(diff) <= spread:
        return "inconclusive (spread >= difference)"
    return "reproduced" if diff > 0 else "not reproduced"


CLAIMS = [  # (id, paper, claim, kind, arguments)
    ("dtm_knn", "DTM",
     "DTM distillation gives a better student than token-wise distillation (k-NN, patch mean)",
     "diff", ("dtm", "tokenwise", "probe:knn_mean")),
    ("dtm_abmilp", "DTM", "... and by the AbMILP probe", "diff",
     ("dtm", "tokenwise", "probe:abmilp")),
    ("dtm_cls", "DTM", "... and by the [cls] linear probe", "diff",
     ("dtm", "tokenwise", "probe:cls")),
    ("mto_simmim_rauc", "MTO", "MTO speeds up SimMIM: RAUC of the k-NN-per-epoch curve > 1",
     "rauc", "simmim"),
    ("mto_simmim_knn", "MTO", "SimMIM + MTO ends with a higher k-NN accuracy than SimMIM", "diff",
     ("simmim_mto", "simmim", "knn_final")),
    ("mto_simmim_het", "MTO",
     "with MTO, SimMIM's H^l falls more from layer 0 to the last (H^0 - H^L)", "diff",
     ("simmim_mto", "simmim", "het_drop")),
    ("mto_mae_rauc", "MTO", "MTO speeds up MAE: RAUC of the k-NN-per-epoch curve > 1", "rauc",
     "mae"),
    ("mto_mae_knn", "MTO", "MAE + MTO ends with a higher k-NN accuracy than MAE", "diff",
     ("mae_mto", "mae", "knn_final")),
    ("mto_mae_het", "MTO",
     "with MTO, MAE's decoder H^l falls more from layer 0 to the last (H^0 - H^L)", "diff",
     ("mae_mto", "mae", "het_drop")),
    ("abmilp_mim", "Beyond [cls]",
     "AbMILP over the frozen patch tokens beats the [cls] linear probe (MIM)", "paired",
     (("simmim", "simmim_mto", "mae", "mae_mto"), "probe:abmilp", "probe:cls")),
]


def judge(claim, records: dict, raucs: dict) -> dict:
    """One claim -> the measured difference, its spread and a suggested verdict."""
    cid, paper, text, kind, args = claim
    out = {"id": cid, "paper": paper, "claim": text}
    if kind == "diff":
        method, base, key = args
        m, b = (summary([metric(r, key) for r in by_variant(records, v)]) for v in (method, base))
        n = min(len(m["values"]), len(b["values"]))
        diff = m["mean"] - b["mean"] if n else None
        spread = max(m["spread"], b["spread"]) if n else None
        out.update(metric=key, method=method, baseline=base, method_mean=m["mean"],
                   baseline_mean=b["mean"], diff=diff, spread=spread,
                   verdict=verdict(diff, spread, n))
    elif kind == "rauc":
        values = raucs.get(args, {}).get("per_seed", [])
        numbers = [v for v in values if isinstance(v, float)]
        s = summary(numbers)
        if not values:
            out.update(verdict="not run")
        elif len(numbers) < len(values):
            undefined = len(values) - len(numbers)
            out.update(verdict=f"inconclusive (RAUC undefined for {undefined} of {len(values)} "
                               "seeds)")
        else:
            out.update(verdict=verdict(s["mean"] - 1.0, s["spread"], len(numbers)))
        out.update(metric="rauc", rauc=values, diff=None if s["mean"] is None else s["mean"] - 1.0,
                   spread=s["spread"])
    else:  # paired over encoders: the sign must agree on every one
        variants, key_m, key_b = args
        diffs = [metric(r, key_m) - metric(r, key_b)
                 for v in variants for r in by_variant(records, v)
                 if metric(r, key_m) is not None and metric(r, key_b) is not None]
        s = summary(diffs)
        if not diffs:
            v = "not run"
        elif min(diffs) > 0:
            v = "reproduced"
        elif max(diffs) < 0:
            v = "not reproduced"
        else:
            v = "inconclusive (the sign differs between encoders)"
        out.update(metric=f"{key_m} - {key_b}", diffs=diffs, diff=s["mean"], spread=s["spread"],
                   verdict=v)
    return out


def machine() -> dict:
    model_name = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        model_name = names[0] if names else model_name
    return {"cpu": model_name, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": torch.cuda.is_available()}


# -----------------------------------------------------------------------------
# results.md: the tables, rendered from results.json

def fmt(s: dict, scale: float = 1.0, digits: int = 2) -> str:
    if not s or s.get("mean") is None:
        return "-"
    text = f"{s['mean'] * scale:.{digits}f}"
    return text + (f" ± {s['spread'] * scale / 2:.{digits}f}" if len(s["values"]) > 1 else "")


def number(x, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else ("-" if x is None else str(x))


def md_header(results: dict) -> list:
    p, m = results["plan"], results["machine"]
    return [f"# Small-scale results ({'quick' if results['quick'] else 'full'} run)", "",
            f"`{results['command']}` on {m['cores']} x {m['cpu']}, torch {m['torch']}; "
            f"{results['wall_s_total'] / 60:.1f} min of runs.",
            f"Encoders {p['model']}, {p['subset']} pre-training images x {p['epochs']} epochs, "
            f"seeds {', '.join(map(str, p['seeds']))}; probes: {p['probe_subset']} training "
            f"images, {p['probe_epochs']} epochs. Values: mean ± half the seed range (top-1 % on "
            "the test split, k-NN k = 20).", ""]


def md_encoders(results: dict) -> list:
    lines = ["## Every encoder", "",
             "| encoder | k-NN during pre-training | [cls] linear | mean linear | AbMILP | "
             "k-NN [cls] | k-NN mean | train img/s |", "|---|---|---|---|---|---|---|---|"]
    for v, t in results["variants"].items():
        cells = [fmt(t["knn_final"]), *(fmt(t[f"probe:{h}"]) for h in HEADS),
                 fmt(t["img_per_s"], digits=0)]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    teacher = results.get("teacher", {})
    if teacher.get("probe"):
        acc = teacher["probe"]["accuracy"]
        cells = ["-", *(number(acc.get(h), 2) for h in HEADS), number(teacher["img_per_s"], 0)]
        top1 = number(teacher.get("val_top1"), 2)
        lines.append(f"| teacher (supervised; test top-1 {top1}) | " + " | ".join(cells) + " |")
    return lines + [""]


def md_mto(results: dict) -> list:
    lines = ["## MTO: RAUC and heterogeneity", "",
             "| framework | RAUC per seed | RAUC of the seed-mean curves | H^0 base / MTO "
             "| H^L base / MTO |",
             "|---|---|---|---|---|"]
    t = results["variants"]
    for fw, r in results["rauc"].items():
        per_seed = ", ".join(number(x) if isinstance(x, float) else "undefined"
                             for x in r["per_seed"])
        mean = r["seed_mean_curves"]
        mean = number(mean) if isinstance(mean, float) else "undefined"
        het = [" / ".join(fmt(t.get(v, {}).get(k), digits=3) for v in (fw, f"{fw}_mto"))
               for k in ("het0", "hetL")]
        lines.append(f"| {fw} | {per_seed or '-'} | {mean} | {het[0]} | {het[1]} |")
    return lines + [""]


def md_cost_and_claims(results: dict) -> list:
    cost_rows = [f"| {name} | {fmt(s, digits=3)} |" for name, s in results["cost"].items()]
    lines = ["## Cost (time per image, method / baseline; > 1 = slower)", "",
             "| method vs baseline | ratio |", "|---|---|", *cost_rows, "",
             "## Claims (suggested verdict; the README gives the final one)", "",
             "| paper | claim | measured difference (spread) | suggested verdict |",
             "|---|---|---|---|"]
    for c in results["claims"]:
        measured = f"{number(c.get('diff'))} ({number(c.get('spread'))})"
        lines.append(f"| {c['paper']} | {c['claim']} | {measured} | {c['verdict']} |")
    return lines + [""]


def render_markdown(results: dict) -> str:
    """results.json -> results.md: the tables, the suggested verdicts, links to the figures."""
    names = [os.path.basename(f) for f in results["figures"]]
    figs = ", ".join(f"[{name}](figures/{name})" for name in names)
    return "\n".join([*md_header(results), *md_encoders(results), *md_mto(results),
                      *md_cost_and_claims(results), f"Figures: {figs}", ""])


# -----------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="one tiny row end to end (vit_micro, 256 images, 1 epoch)")
    ap.add_argument("--out", default=os.path.join(ROOT, "experiments"),
                    help="writes OUT/runs/, OUT/results.json, OUT/results.md, OUT/figures/")
    ap.add_argument("--model", default=None,
                    help="override the plan's encoder size (a model.VIT_SIZES name)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="override the plan's seeds")
    return ap.parse_args(argv)


def make_plan(args) -> Plan:
    plan = dataclasses.replace(QUICK if args.quick else Plan())
    if args.model:
        plan.model = args.model
    if args.seeds:
        plan.seeds = tuple(args.seeds)
    if plan.model not in M.VIT_SIZES:
        sys.exit(f"error: --model {plan.model} is not in model.VIT_SIZES: choose one of "
                 f"{', '.join(M.VIT_SIZES)}")
    return plan


def plan_runs(plan: Plan, runs_dir: str) -> list:
    """[(run, probe run or None)] in launch order: the teacher, then per seed every variant."""
    teacher = teacher_run(plan, runs_dir)
    teacher_enc = os.path.join(teacher.out_dir, "encoder.pth")
    pairs = [(teacher, probe_run(plan, teacher_enc, teacher) if plan.probe_teacher else None)]
    for seed in plan.seeds:
        for variant in plan.variants:
            run = pretrain_run(plan, runs_dir, variant, seed, teacher_enc)
            pairs.append((run, probe_run(plan, os.path.join(run.out_dir, "encoder.pth"), run)))
    return pairs


def main(argv):
    args = parse_args(argv)
    plan = make_plan(args)
    out = os.path.abspath(args.out)
    runs_dir = os.path.join(out, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    # SIGTERM = Ctrl-C: the script checkpoints
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    pairs = plan_runs(plan, runs_dir)
    total = sum(1 + (p is not None) for _, p in pairs)
    print(f"{total} runs ({plan.model}, seeds {plan.seeds}) into {rel(runs_dir)}", flush=True)

    # ---------------------------------------------------------------------
    # Runs: the teacher first (its encoder file is the distillation target), then the rest
    infos, index = {}, 0
    for run, probe in pairs:
        index += 1
        infos[run.name] = launch(run, index, total)
        if run.name == "teacher":
            teacher_encoder(run.out_dir)
        if probe is not None:
            index += 1
            infos[probe.name] = launch(probe, index, total)

    # ---------------------------------------------------------------------
    # Measurements, summaries, claims
    print("measuring: k-NN curves, H^l per layer, RAUC, cost", flush=True)
    records = {}
    for run, probe in pairs:
        probe_info = infos.get(probe.name, {}) if probe else {}
        records[run.name] = run_record(run, infos[run.name], probe, probe_info, plan)
    teacher = records.pop("teacher")
    teacher_dir = pairs[0][0].out_dir
    teacher_log = read_log(os.path.join(teacher_dir, "log.jsonl"))
    val_top1 = next((r["val_top1"] for r in reversed(teacher_log) if "val_top1" in r), None)
    teacher.update(encoder=rel(os.path.join(teacher_dir, "encoder.pth")), val_top1=val_top1)
    raucs = {fw: rauc_of(records, fw, f"{fw}_mto") for fw in ("simmim", "mae")
             if by_variant(records, fw) and by_variant(records, f"{fw}_mto")}
    cost = {f"{m} vs {b}": cost_ratio(records, b, m) for m, b in
            (("dtm", "tokenwise"), ("simmim_mto", "simmim"), ("mae_mto", "mae"))
            if by_variant(records, b) and by_variant(records, m)}
    command = "python experiments/small_scale.py " + " ".join(argv)
    results = {"quick": args.quick, "command": command,
               "machine": machine(), "plan": dataclasses.asdict(plan),
               "wall_s_total": sum(i.get("wall_s", 0.0) for i in infos.values()),
               "teacher": teacher, "runs": records,
               "variants": variant_table(records, plan.variants),
               "rauc": raucs, "cost": cost, "claims": [judge(c, records, raucs) for c in CLAIMS]}

    # ---------------------------------------------------------------------
    # Figures, results.json, results.md
    print("drawing figures", flush=True)
    drawn = figures.make_all(results, os.path.join(out, "figures"), plan.fig_images)
    results["figures"] = [rel(f) for f in drawn]
    write_json(results, os.path.join(out, "results.json"))
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(render_markdown(results))
    print(f"done: {rel(os.path.join(out, 'results.json'))}, results.md, figures/ "
          f"({results['wall_s_total'] / 60:.1f} min of runs)", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit("interrupted: start the same command again to resume")
