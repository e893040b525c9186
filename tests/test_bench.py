"""Smoke test of bench.py: its CPU mode with the smallest settings gives every expected row.

No timing assertions: the numbers only have to be there and positive.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bench  # noqa: E402


def test_vit_base_forward_flops_match_the_published_count():
    """ViT-B/16 at 224 px: 17.6 GMACs (fvcore, as timm and the ViT papers quote it) =
    35.2 GFLOPs."""
    flops = bench.vit_forward_flops(depth=12, dim=768, num_patches=196, patch_size=16)
    assert flops == pytest.approx(2 * 17.58e9, rel=0.01)


def test_cpu_mode_smallest_settings_gives_every_row(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench.py", "--device", "cpu", "--no-compile", "--models", "vit_micro",
           "--batch", "2", "--warmup", "1", "--steps", "2", "--data", "jpeg", "--jpeg-count", "8",
           "--jpeg-dir", str(tmp_path / "jpegs"), "--workers", "1", "--json", str(out),
           "model=vit_micro"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "RANDOM" in p.stdout and "ratio" in p.stdout  # the warning and the table header

    rows = json.loads(out.read_text())["rows"]
    names = {(r["section"], r["variant"]) for r in rows}
    teacher = "vit_micro+bench-tiny-clip"
    expected = {("step", f"vit_micro {who} eager") for who in ("ours", "timm")}
    expected |= {("distill", f"{teacher} {kind} eager") for kind in ("tokenwise", "dtm")}
    expected |= {("dtm", f"assignment N=196 N_m={nm} k={k}") for nm, k in bench.DTM_CASES}
    expected |= {("dtm", "assignment N=196, 2 levels drawn"),
                 ("dtm", "loss fwd+bwd N=49 tokenwise"), ("dtm", "loss fwd+bwd N=49 dtm")}
    expected |= {("data", "dtm eager, tensors on device"), ("data", "dtm eager, fed from JPEGs"),
                 ("data", "loader alone: decode, augment, mask, pin")}
    expected |= {("relpos", f"vit_micro eager {label}") for label in bench.RELPOS}
    expected |= {("loader", "before: jitter first, float32"),
                 ("loader", "after: crop first, uint8")}
    assert names == expected
    for r in rows:
        assert r["ms"] > 0, r
        assert r["images_s"] is None or r["images_s"] > 0, r
        if r["ref"] is not None:
            assert r["ratio"] > 0, r
        assert r["mfu"] is None and r["peak_gib"] is None  # n/a on CPU
    # point 5, counted: the MAE encoder's and mto_losses' reads of |M| are gone (|M| is known);
    # no DDP buffer copy for the constant tables (3 in vit_micro with relative position bias);
    # one multi-tensor lerp for the EMA teacher instead of one per parameter tensor
    counts = {c["what"].split(",")[0]: (c["before"], c["after"])
              for c in json.loads(out.read_text())["counts"]}
    assert counts == {"host reads": (2, 0), "buffers DDP copies per forward": (3, 0),
                      "ops of one EMA teacher update": (37, 1)}
    ours = next(r for r in rows if r["variant"] == "vit_micro ours eager")
    assert ours["vs"] == "timm eager"
