"""Pinned runs: short pre-training runs whose final encoder weights must not change by a bit.

A refactor of the stage scripts must keep behaviour; these checksums were recorded before one.
If a change is meant to alter training (a new default, a fixed bug), update the checksum in the
same commit and say why in its message. One CPU thread; float kernels differ between torch
versions, CPU instruction sets and CPU models (the same fp32 runs gave other bits on an Intel
Xeon with AVX512 and AMX than on the AMD EPYC with AVX512 that recorded them), so the sums
hold for the torch version, CPU capability and vendor they were recorded on (elsewhere the test
is skipped and says why).
"""
import hashlib
import os

import pytest
import torch

from test_pretrain import ROOT, TINY, run

PINNED_TORCH = "2.14"
PINNED_CPU = "AVX512"  # torch.backends.cpu.get_cpu_capability() where the sums were recorded
PINNED_VENDOR = "AuthenticAMD"  # /proc/cpuinfo's vendor_id there (an AMD EPYC)
RUNS = {  # name: (overrides, sha256 of the encoder's tensors in key order)
    "dtm_ema": (["loss=dtm", "teacher=ema"],
                "0980741c9ec07b666e62a81e0ee6b40f29b32d6ade3aeb441317c5ffce67c608"),
    "simmim_mto": (["framework=simmim", "mask=random", "mto=true"],
                   "5263a40e70500f3649f93c1033b7b5c46730ae16c54880a10373948da047159e"),
    "mae_mto": (["framework=mae", "mask=random", "mto=true", "decoder_dim=32",
                 "decoder_depth=1", "decoder_heads=2"],
                "c7475b2e8444c707fdeede5066de84e9332e459b7f7c3380bfdd9edc0f348819"),
}


def cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":")[1].strip() for line in f
                         if line.startswith("vendor_id")), "unknown")
    except OSError:
        return "unknown"


def encoder_sha256(out_dir: str) -> str:
    state = torch.load(os.path.join(out_dir, "encoder.pth"), weights_only=True)["model"]
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.skipif(not torch.__version__.startswith(PINNED_TORCH)
                    or torch.backends.cpu.get_cpu_capability() != PINNED_CPU
                    or cpu_vendor() != PINNED_VENDOR,
                    reason=f"checksums were recorded with torch {PINNED_TORCH} on a {PINNED_CPU} "
                           f"CPU by {PINNED_VENDOR}; this is {cpu_vendor()}")
@pytest.mark.parametrize("name", sorted(RUNS))
def test_pinned_run_weights(tiny_imagefolder, tmp_path, name):
    overrides, expected = RUNS[name]
    out = str(tmp_path / name)
    run([*TINY, f"data_path={tiny_imagefolder}", f"out_dir={out}", "epochs=1", "seed=3",
         "blr=1e-3", "min_lr=1e-6", "warmup_epochs=1", "precision=fp32", *overrides])
    assert encoder_sha256(out) == expected, f"{name}: the final weights changed"
