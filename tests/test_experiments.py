"""experiments/small_scale.py: the --quick run end to end (teacher, a distillation run, SimMIM with
and without MTO, their probes, results.json, results.md, figures), skipping finished runs on a
second start, refusing a run folder made by other settings; and the claim arithmetic."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import small_scale as S  # noqa: E402

QUICK_RUNS = {"dtm-s0", "simmim-s0", "simmim_mto-s0"}
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


def test_quick_results_json(quick):
    out, results, _ = quick
    keys = {"plan", "machine", "teacher", "runs", "variants", "rauc", "cost", "claims", "figures"}
    assert keys <= set(results)
    assert results["quick"] and results["plan"]["model"] == "vit_micro"
    assert set(results["runs"]) == QUICK_RUNS
    assert os.path.isfile(S.figures.resolve(results["teacher"]["encoder"]))
    for name, rec in results["runs"].items():
        assert rec["seed"] == 0 and rec["img_per_s"] > 0 and rec["wall_s"] > 0
        assert [e for e, _ in rec["knn_curve"]] == [1.0] and 0 <= rec["knn_final"] <= 100
        acc = rec["probe"]["accuracy"]
        assert set(acc) == set(S.HEADS) and all(0 <= a <= 100 for a in acc.values())
        assert rec["probe"]["path"] == "cached"
    for name in ("simmim-s0", "simmim_mto-s0"):  # vit_micro: embedding + 2 blocks
        h = results["runs"][name]["heterogeneity"]
        assert len(h["mean"]) == 3 and all(0 <= x <= h["log_visible"] + 1e-6 for x in h["mean"])
    assert set(results["variants"]) == {"dtm", "simmim", "simmim_mto"}
    # one epoch: RAUC has no interval, and says so instead of a number
    assert results["rauc"]["simmim"]["per_seed"][0].startswith("undefined")
    assert set(results["cost"]) == {"simmim_mto vs simmim"}
    assert results["cost"]["simmim_mto vs simmim"]["mean"] > 0
    claims = {c["id"]: c for c in results["claims"]}
    assert set(claims) == {c[0] for c in S.CLAIMS}
    assert claims["dtm_knn"]["verdict"] == "not run"  # no token-wise run in --quick
    assert claims["mto_simmim_knn"]["verdict"] == "inconclusive (one seed)"
    assert claims["mto_simmim_rauc"]["verdict"].startswith("inconclusive (RAUC undefined")


def test_quick_figures_and_markdown(quick):
    out, results, _ = quick
    assert {os.path.basename(f) for f in results["figures"]} == FIGURES
    for name in FIGURES:
        with open(out / "figures" / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| simmim_mto |" in md and "## Claims" in md and "figures/masks.png" in md
    for rec in results["runs"].values():  # everything under --out, nothing in the repository
        assert rec["out_dir"].startswith(str(out)) and rec["encoder"].startswith(str(out))


def test_second_start_skips_finished_runs_and_refuses_other_settings(quick):
    out, results, _ = quick
    p = driver(out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("finished before, skipped") == 7  # teacher + 3 runs + 3 probes
    with open(out / "results.json") as f:
        assert set(json.load(f)["runs"]) == QUICK_RUNS
    info_path = out / "runs" / "teacher" / "run.json"
    info = json.loads(info_path.read_text())
    info["args"] = info["args"] + ["epochs=2"]
    info_path.write_text(json.dumps(info))
    p = driver(out)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].startswith("error: ") and "other settings" in p.stderr


def test_verdicts_and_summaries():
    assert S.summary([1.0, 3.0]) == {"mean": 2.0, "spread": 2.0, "values": [1.0, 3.0]}
    assert S.verdict(2.5, 2.0, 2) == "reproduced"
    assert S.verdict(-2.5, 2.0, 2) == "not reproduced"
    assert S.verdict(1.5, 2.0, 2).startswith("inconclusive")
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
