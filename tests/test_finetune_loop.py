"""finetune.main with gradient accumulation: stopped by SIGTERM mid-epoch and resumed, it ends
with the weights of an uninterrupted run (checkpoint.pth, best.pth, model_timm.pth)."""
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_injection as F  # noqa: E402

EXTRA = ["accum_steps=2"]


def test_run_stopped_mid_epoch_and_resumed_equals_uninterrupted(tiny_imagefolder, tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    p = F.run("finetune.py", F.tiny_args("finetune.py", tiny_imagefolder, ref) + EXTRA)
    assert p.returncode == 0, p.stderr[-2000:]
    args = F.tiny_args("finetune.py", tiny_imagefolder, out) + EXTRA
    first = F.run("finetune.py", args, fault="term-step:6")
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-2000:]
    assert "stopped by signal at step 6" in first.stdout
    second = F.run("finetune.py", args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout

    for name in ("checkpoint.pth", "best.pth", "model_timm.pth"):
        a = torch.load(os.path.join(ref, name), weights_only=True)
        b = torch.load(os.path.join(out, name), weights_only=True)
        assert F.same_weights(a["model"], b["model"]), name
    a = torch.load(os.path.join(ref, "checkpoint.pth"), weights_only=True)
    b = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert a["best"] == b["best"] and b["step"] == 12
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert [r["epoch"] for r in records if "val_top1" in r] == [1, 2, 3]
