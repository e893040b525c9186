"""experiments/small_scale.py: the --quick run end to end (the CNN teacher in process, a DTM and a
SimMIM run, their probes with the baselines, a fine-tuning run, results.json, results.md,
figures), skipping finished runs on a second start, refusing a run folder made by other
settings; and the claim arithmetic, the baseline claims and the choice of a third seed."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import small_scale as S  # noqa: E402

QUICK_RUNS = {"dtm-s0", "simmim-s0"}
FIGURES = {"masks.png", "token_morphing.png", "heterogeneity.png", "learning_curves.png",
           "beyond_cls_dtm_maps.png", "beyond_cls_dtm_stats.png", "beyond_cls_simmim_maps.png",
           "beyond_cls_simmim_stats.png"}


def driver(out, *extra):
    # one thread, as every other script the tests start: on 2 cores it halves the --quick run
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "experiments/small_scale.py", "--quick", "--out", str(out), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("small_scale")
    p = driver(out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f), p.stdout


def test_quick_teacher_baselines_and_finetune(quick):
    out, results, _ = quick
    t = results["teacher"]  # the SmallCNN, trained in process; its file records the numbers
    assert t["kind"] == "cnn" and os.path.isfile(S.figures.resolve(t["file"]))
    assert t["epochs"] == 1 and t["images"] == 256 and 0 <= t["test_top1"] <= 100
    assert t["wall_s"] > 0 and t["target_top1"] == S.TEACHER_TARGET
    for rec in results["runs"].values():  # every distillation run reads that file
        if rec["row"] == "distill":
            assert f"teacher=cnn teacher_pretrained={t['file']}" in rec["command"]
    # one baseline probe per architecture: 28 px distillation, 32 px SimMIM
    base = results["baselines"]
    assert {r: b["img_size"] for r, b in base.items()} == {"distill": 28, "simmim": 32}
    for b in base.values():
        assert set(b["random"]) == set(S.HEADS) and set(b["pixels"]) == {"linear", "knn"}
        assert all(0 <= a <= 100 for a in [*b["random"].values(), *b["pixels"].values()])
    probes = {n: r["probe"]["baselines"] for n, r in results["runs"].items()}
    assert probes == {"dtm-s0": True, "simmim-s0": True}
    f = results["finetune"]["finetune-dtm"]  # quick: only the fine-tuning from DTM
    assert set(results["finetune"]) == {"finetune-dtm"} and f["epochs"] == 1
    assert 0 <= f["final_top1"] <= f["best_top1"] <= 100
    assert "init=" + results["runs"]["dtm-s0"]["encoder"] in f["command"]


def test_quick_results_json(quick):
    out, results, _ = quick
    keys = {"plan", "machine", "teacher", "baselines", "finetune", "runs", "variants", "rauc",
            "cost", "claims", "third_seed", "figures", "partial"}
    assert keys <= set(results)
    assert results["quick"] and results["plan"]["model"] == "vit_micro"
    assert set(results["runs"]) == QUICK_RUNS and results["num_runs"] == 6
    for name, rec in results["runs"].items():
        assert rec["seed"] == 0 and rec["img_per_s"] > 0 and rec["wall_s"] > 0
        assert [e for e, _ in rec["knn_curve"]] == [1.0] and 0 <= rec["knn_final"] <= 100
        acc = rec["probe"]["accuracy"]
        assert set(acc) == set(S.HEADS) and all(0 <= a <= 100 for a in acc.values())
        assert rec["probe"]["path"] == "cached"
    h = results["runs"]["simmim-s0"]["heterogeneity"]  # vit_micro: embedding + 2 blocks
    assert len(h["mean"]) == 3 and all(0 <= x <= h["log_visible"] + 1e-6 for x in h["mean"])
    assert set(results["variants"]) == {"dtm", "simmim"}
    assert results["rauc"] == {} and results["cost"] == {}  # no MTO run in --quick
    assert results["third_seed"] == {"seed": None, "variants": [], "claims": []}
    claims = {c["id"]: c for c in results["claims"]}
    assert set(claims) == {c[0] for c in S.CLAIMS}
    assert claims["dtm_knn"]["verdict"] == "not run"  # no token-wise run in --quick
    assert claims["dtm_fixed_knn"]["verdict"] == "not run"
    random = claims["simmim_random"]  # against the random-init encoder of its architecture
    assert random["verdict"] == "inconclusive (one seed)"
    assert random["baseline_mean"] == results["baselines"]["simmim"]["random"]["knn_mean"]


def test_partial_results_say_so(quick):
    """Before a third-seed pass the driver writes the two-seed tables marked partial (a pass cut
    off loses none of them); the finished run's files carry no mark."""
    _, results, _ = quick
    assert results["partial"] == "" and "Partial" not in S.render_markdown(results)
    md = S.render_markdown({**results, "partial": "seed 2 of dtm still running"})
    assert "**Partial: written before the third-seed pass (seed 2 of dtm still running)" in md


def test_quick_figures_and_markdown(quick):
    out, results, _ = quick
    assert {os.path.basename(f) for f in results["figures"]} == FIGURES
    for name in FIGURES:
        with open(out / "figures" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| simmim |" in md and "## Claims" in md and "figures/masks.png" in md
    assert "| raw pixels (28 px; baseline) |" in md and "| raw pixels (32 px; baseline) |" in md
    assert "| random-init vit_micro (SimMIM, 32 px; baseline) |" in md
    assert ">= 88" in md and ">= 90% test top-1" in md and "RAUC caveat" in md
    assert "min of runs" in md and "Budget (the plan): teacher 256 images x 1 epoch;" in md
    for rec in results["runs"].values():  # everything under --out, nothing in the repository
        assert rec["out_dir"].startswith(str(out)) and rec["encoder"].startswith(str(out))


def test_second_start_skips_finished_runs_and_refuses_other_settings(quick):
    out, results, _ = quick
    p = driver(out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("finished before, skipped") == 6  # teacher, 2 runs, 2 probes, finetune
    with open(out / "results.json") as f:
        assert set(json.load(f)["runs"]) == QUICK_RUNS
    info_path = out / "runs" / "teacher" / "run.json"
    info = json.loads(info_path.read_text())
    info["args"] = info["args"] + ["teacher_epochs=2"]
    info_path.write_text(json.dumps(info))
    p = driver(out)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "other settings" in p.stderr


def test_verdicts_and_summaries():
    assert S.summary([1.0, 3.0]) == {"mean": 2.0, "spread": 2.0, "values": [1.0, 3.0]}
    assert S.verdict(2.5, 2.0, 2) == "reproduced"
    assert S.verdict(-2.5, 2.0, 2) == "not reproduced"
    assert S.verdict(1.5, 2.0, 2) == S.INCONCLUSIVE
    assert S.verdict(5.0, 0.0, 1) == "inconclusive (one seed)"
    accuracies = (("dtm", (80.0, 81.0)), ("tokenwise", (78.0, 78.5)))
    records = {f"{v}-s{s}": {"variant": v, "seed": s, "probe": {"accuracy": {"knn_mean": acc}}}
               for v, accs in accuracies for s, acc in enumerate(accs)}
    c = S.judge(S.CLAIMS[0], records, {})
    assert c["diff"] == pytest.approx(2.25) and c["spread"] == pytest.approx(1.0)
    assert c["verdict"] == "reproduced"
    curves = {"simmim": [(1, 50.0), (2, 60.0), (3, 65.0)],
              "simmim_mto": [(1, 50.0), (2, 64.0), (3, 66.0)]}
    records = {v: {"variant": v, "seed": 0, "knn_curve": c} for v, c in curves.items()}
    rauc = S.rauc_of(records, "simmim", "simmim_mto")["per_seed"][0]
    assert rauc == pytest.approx((7 + 15) / (5 + 12.5))
    flat = {v: {"variant": v, "seed": 0, "knn_curve": [(1, 50.0), (2, 50.0)]} for v in curves}
    assert S.rauc_of(flat, "simmim", "simmim_mto")["per_seed"][0].startswith("undefined")


def test_random_init_claims_and_the_third_seed():
    """A MIM variant against its architecture's random-init encoder (one number: the spread is
    the variant's); a third seed goes to the variants of the claims INCONCLUSIVE on two seeds,
    and only to them."""
    knn = {("mae", 0): 60.0, ("mae", 1): 64.0, ("mae_mto", 0): 70.0, ("mae_mto", 1): 71.0,
           ("dtm", 0): 80.0, ("dtm", 1): 81.0, ("fixed", 0): 79.0, ("fixed", 1): 82.0}
    records = {f"{v}-s{s}": {"variant": v, "seed": s, "probe": {"accuracy": {"knn_mean": a}}}
               for (v, s), a in knn.items()}
    baselines = {"mae": {"random": {"knn_mean": 61.0}}}
    claims = {c[0]: S.judge(c, records, {}, baselines) for c in S.CLAIMS}
    mae, mae_mto = claims["mae_random"], claims["mae_mto_random"]
    assert mae["diff"] == pytest.approx(1.0) and mae["spread"] == pytest.approx(4.0)
    assert mae["verdict"] == S.INCONCLUSIVE and mae_mto["verdict"] == "reproduced"
    assert claims["simmim_random"]["verdict"] == "not run"
    assert claims["dtm_fixed_knn"]["verdict"] == S.INCONCLUSIVE  # +0.0 against a spread of 3
    assert claims["dtm_knn"]["verdict"] == "not run"
    chosen = S.third_seed_variants(list(claims.values()), S.Plan())
    assert chosen == ["dtm", "fixed", "mae"]
    assert S.third_seed_variants([], S.Plan()) == []


def test_a_run_recorded_before_a_key_was_removed_still_loads():
    """experiments/heterogeneity.py reads a run's recorded config; keys a later version removed
    (skip_nonfinite, max_corrupt_frac: the cut of issue 32) are dropped, not an error."""
    import dataclasses
    import heterogeneity
    import pretrain
    old = {**dataclasses.asdict(pretrain.Config()), "framework": "simmim", "skip_nonfinite": 0,
           "max_corrupt_frac": 0.01}
    assert heterogeneity.recorded_config(pretrain.Config, old).framework == "simmim"
