"""Does DTM's gain over token-wise distillation grow with the teacher's spatial inconsistency?

The default job's CNN teacher has almost none (experiments/spatial_inconsistency.py: morphing
hardly changes its patch-wise ensemble), which may be why DTM equals token-wise there. Here the
inconsistency is a controlled dose: the teacher's tokens go through
spatial_inconsistency.perturb (independent noise of `noise` x the tokens' std, and/or each
token swapped, with probability `swap`, for the same patch's token of another image), drawn
anew every step from the step's own seed (so a resumed run draws the same). At each dose, DTM
and token-wise distil the same student with the same budget and seeds; each encoder is scored
by k-NN (pretrain.py's final_knn: raw pixels and a random-init encoder beside it) and a linear
probe on the patch mean (probe.py).

    python experiments/spatial_inconsistency.py ...   # (optional) the Table-1 numbers per dose
    python experiments/dose_response.py --teacher runs/spatial/teacher_cnn.pth \
        --doses noise=0 noise=1 noise=2 swap=0.5 --seeds 0 1 --out runs/dose
    python experiments/dose_response.py --report --out runs/dose   # table + figure again

A finished run is skipped on a rerun (its encoder.pth and probe results exist), so an
interrupted study goes on where it stopped.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

DISTILL = ["--config", "configs/fmnist_dtm.yaml", "subset=20000", "epochs=3", "num_workers=0",
           "final_knn=true"]
PROBE = ["--config", "configs/fmnist_probe.yaml", "subset=10000", "val_subset=0", "epochs=20",
         "warmup_epochs=2", "heads=[mean]", "knn=[mean]", "num_workers=0"]


class DosedTeacher(torch.nn.Module):
    """A teacher whose target tokens carry a dose of spatial inconsistency (perturb)."""

    def __init__(self, teacher, noise: float, swap: float):
        super().__init__()
        self.teacher, self.noise, self.swap = teacher, noise, swap
        self.out_dim, self.num_patches = teacher.out_dim, teacher.num_patches

    def forward(self, x):                                   # -> (B, N, C)
        from spatial_inconsistency import perturb
        v = self.teacher(x)
        g = torch.Generator(device=v.device).manual_seed(torch.initial_seed())  # the step's seed
        return perturb(v, self.noise, self.swap, g)


def train(noise: float, swap: float, argv):
    """pretrain.py's main with the teacher wrapped in DosedTeacher."""
    import common
    import pretrain
    build = pretrain.build_teacher
    pretrain.build_teacher = lambda *a: DosedTeacher(build(*a), noise, swap)
    print(f"DOSE: teacher tokens with noise {noise} x std, swap probability {swap}", flush=True)
    sys.argv = ["pretrain.py", *argv]
    common.run_main(pretrain.main)


def parse_dose(text: str):
    key, value = text.split("=")
    if key not in ("noise", "swap"):
        raise SystemExit(f"error: a dose is noise=S or swap=P, got '{text}'")
    return {"noise": 0.0, "swap": 0.0, key: float(value)}


def run(cmd, log):
    print("$", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"error: failed, see {log}")


def study(args):
    for dose in args.doses:
        d = parse_dose(dose)
        for loss in ("dtm", "tokenwise"):
            for seed in args.seeds:
                out = os.path.join(args.out, dose, f"{loss}-s{seed}")
                os.makedirs(out, exist_ok=True)
                if not os.path.isfile(os.path.join(out, "encoder.pth")) or not knn_of(out):
                    run([sys.executable, __file__, "--train", str(d["noise"]), str(d["swap"]),
                         "--", *DISTILL, *args.set, f"loss={loss}", f"seed={seed}", "teacher=cnn",
                         f"teacher_pretrained={args.teacher}", f"out_dir={out}"],
                        os.path.join(out, "train.txt"))
                probe = os.path.join(out, "probe")
                if not os.path.isfile(os.path.join(probe, "results.json")):
                    first = dose == args.doses[0] and loss == "dtm" and seed == args.seeds[0]
                    run([sys.executable, "probe.py", *PROBE, *args.probe_set,
                         f"backbone={out}/encoder.pth",
                         f"seed={seed}", f"baselines={'true' if first else 'false'}",
                         f"out_dir={probe}"], os.path.join(out, "probe.txt"))
    report(args)


def knn_of(out: str):
    """pretrain.py's final_knn record in log.jsonl: {feature: top-1}, or None."""
    path = os.path.join(out, "log.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    return next((r["final_knn_top1"] for r in records if "final_knn_top1" in r), None)


def probe_of(out: str) -> dict:
    """probe.py's top-1 (%) per row: mean (linear, patch mean), random_mean, pixels_linear ..."""
    with open(os.path.join(out, "probe", "results.json")) as f:
        return json.load(f)["accuracy"]


def report(args):
    """The table (seed means, and the spread) and the figure: DTM minus token-wise per dose."""
    rows = []
    for dose in args.doses:
        row = {"dose": dose}
        for loss in ("dtm", "tokenwise"):
            outs = [os.path.join(args.out, dose, f"{loss}-s{s}") for s in args.seeds]
            outs = [o for o in outs if knn_of(o)]        # a dose may have more seeds than another
            knn = [100 * knn_of(o)["trained mean"] for o in outs]
            lin = [probe_of(o)["mean"] for o in outs]
            row[loss] = {"knn": knn, "linear": lin}
        rows.append(row)
    first = probe_of(os.path.join(args.out, args.doses[0], f"dtm-s{args.seeds[0]}"))
    base = knn_of(os.path.join(args.out, args.doses[0], f"dtm-s{args.seeds[0]}"))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"baselines: raw pixels k-NN {100 * base['pixels']:.2f}, linear "
          f"{first['pixels_linear']:.2f}; random-init vit_mini k-NN (patch mean) "
          f"{100 * base['random-init mean']:.2f}, linear {first['random_mean']:.2f}")
    print("| dose | DTM k-NN | token-wise k-NN | diff | DTM linear | token-wise linear | diff |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = []
        for metric in ("knn", "linear"):
            a, b = r["dtm"][metric], r["tokenwise"][metric]
            cells += [" / ".join(f"{x:.2f}" for x in a), " / ".join(f"{x:.2f}" for x in b),
                      f"{mean(a) - mean(b):+.2f}"]
        print(f"| {r['dose']} | " + " | ".join(cells) + " |")
    with open(os.path.join(args.out, "dose_response.json"), "w") as f:
        json.dump({"rows": rows}, f, indent=1)
    figure(rows, os.path.join(ROOT, "experiments", "figures", "dose_response.png"))


def figure(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(rows))
    for metric, label in (("knn", "k-NN (patch mean)"), ("linear", "linear probe (patch mean)")):
        diffs = [[a - b for a, b in zip(r["dtm"][metric], r["tokenwise"][metric])] for r in rows]
        ax.plot(x, [sum(d) / len(d) for d in diffs], marker="o", label=label)
        for i, d in enumerate(diffs):
            ax.scatter([i] * len(d), d, s=10, color="grey")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(x), [r["dose"] for r in rows])
    ax.set_xlabel("dose of spatial inconsistency in the teacher's tokens")
    ax.set_ylabel("DTM - token-wise (points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--train":
        noise, swap = float(sys.argv[2]), float(sys.argv[3])
        return train(noise, swap, sys.argv[5:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/spatial/teacher_cnn.pth",
                   help="the CNN teacher (pretrain.py's teacher=cnn cache)")
    p.add_argument("--doses", nargs="+", default=["noise=0", "noise=1", "noise=2", "swap=0.5"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--out", default="runs/dose")
    p.add_argument("--set", nargs="*", default=[], help="pretrain.py key=value overrides")
    p.add_argument("--probe-set", nargs="*", default=[], help="probe.py key=value overrides")
    p.add_argument("--report", action="store_true", help="only the table and the figure")
    args = p.parse_args()
    if not args.report and not os.path.isfile(args.teacher):
        raise SystemExit(f"error: --teacher '{args.teacher}' does not exist: train it with "
                         "pretrain.py --config configs/fmnist_dtm.yaml (out_dir/teacher_cnn.pth)")
    report(args) if args.report else study(args)


if __name__ == "__main__":
    main()
