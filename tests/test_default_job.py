"""The default job's pieces: the CNN stand-in teacher, the final k-NN report, the lr conventions."""
import functools
import json
import os

import pytest
import torch

import model as M
import pretrain
from fault_injection import in_parallel
from test_pretrain import TINY, run


def test_small_cnn_gives_one_token_per_4px_patch():
    cnn = M.SmallCNN(num_classes=10)
    x = torch.randn(2, 3, 28, 28)
    assert cnn(x).shape == (2, 49, 128)                      # 7 x 7 grid, width 128
    assert cnn.classify(x).shape == (2, 10)
    teacher = M.CNNTeacher(cnn, img_size=28)
    teacher.train()                                          # a teacher stays in eval mode
    assert not teacher.cnn.training and teacher.num_patches == 49 and teacher.out_dim == 128
    v = teacher(x)
    assert v.shape == (2, 49, 128) and not v.requires_grad
    assert torch.equal(v, cnn.eval()(x))


def test_knn_top1_by_hand():
    """Two classes on either side of a large common offset; k=1 so the nearest neighbour decides."""
    offset = torch.tensor([50.0, 0.0])
    bank = torch.tensor([[0.0, 1.0], [0.2, 1.0], [0.0, -1.0], [0.2, -1.0]]) + offset
    labels = torch.tensor([0, 0, 1, 1])
    val = torch.tensor([[0.1, 0.9], [0.1, -0.9], [0.1, 0.8]]) + offset
    assert pretrain.knn_top1(bank, labels, val, torch.tensor([0, 1, 0]), k=1, num_classes=2) == 1.0
    top1 = pretrain.knn_top1(bank, labels, val, torch.tensor([0, 0, 1]), k=1, num_classes=2)
    assert top1 == pytest.approx(1 / 3)
    # centred: adding the same vector to every feature changes nothing
    shifted = pretrain.knn_top1(bank + 7, labels, val + 7, torch.tensor([0, 0, 1]), k=1,
                                num_classes=2)
    assert shifted == pytest.approx(1 / 3)


def test_cnn_teacher_run_prints_baselines_and_reuses_teacher(tiny_imagefolder, tmp_path):
    out = str(tmp_path / "run")
    args = [*TINY, f"data_path={tiny_imagefolder}", f"out_dir={out}", "teacher=cnn", "epochs=1",
            "final_knn=true", "knn_bank=16", "knn_k=3"]
    p = run(args)
    assert "teacher=cnn: training a small CNN" in p.stdout
    assert os.path.isfile(os.path.join(out, "teacher_cnn.pth"))
    for line in ("raw pixels", "random-init vit_micro", "trained vit_micro", "both baselines"):
        assert line in p.stdout, p.stdout[-2000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        final = [json.loads(x) for x in f if "final_knn_top1" in x][-1]["final_knn_top1"]
    assert set(final) == {"pixels", "random-init [cls]", "random-init mean", "trained [cls]",
                          "trained mean"}
    assert all(0.0 <= a <= 1.0 for a in final.values())
    again = run([*args, f"out_dir={tmp_path / 'second'}",
                 f"teacher_pretrained={out}/teacher_cnn.pth"])
    assert "using the trained CNN" in again.stdout and "training a small CNN" not in again.stdout


def side_by_side(tiny_imagefolder, tmp_path_factory, cases: list, check=True) -> dict:
    """Each case's extra args run on TINY into its own folder; the independent runs side by side
    (in_parallel) -> {args: (out_dir, process)}."""
    outs = {tuple(args): tmp_path_factory.mktemp("default_job") for args in cases}
    done = in_parallel([functools.partial(
        run, [*TINY, f"data_path={tiny_imagefolder}", f"out_dir={out}", *args], check=check)
        for args, out in outs.items()])
    return {args: (out, p) for (args, out), p in zip(outs.items(), done)}


LR_CONVENTIONS = [
    (["lr=0.01"], "peak lr 0.01 (lr, as given: BEiT v2 convention)"),
    (["blr=1.28e-3"], "peak lr 4e-05 (blr 0.00128 x batch 8 / 256: MAE convention)"),
]


@pytest.fixture(scope="module")
def lr_runs(tiny_imagefolder, tmp_path_factory):
    """TINY (2 epochs) with each lr of LR_CONVENTIONS, side by side."""
    return side_by_side(tiny_imagefolder, tmp_path_factory, [a for a, _ in LR_CONVENTIONS])


@pytest.mark.parametrize("args, printed", LR_CONVENTIONS)
def test_lr_convention_printed(lr_runs, args, printed):
    out, p = lr_runs[tuple(args)]  # 2 epochs
    assert printed in p.stdout
    with open(os.path.join(out, "log.jsonl")) as f:
        lrs = [json.loads(x)["lr"] for x in f if '"lr"' in x]
    peak = float(printed.split()[2])
    assert max(lrs) == pytest.approx(peak, rel=0.01)


CONFIG_ERRORS = [
    (["teacher=cnn", "patch_size=8"], "teacher=cnn gives one token per 4 x 4 px patch"),
    (["lr=-1"], "config key 'lr' must be >= 0, got -1"),
]


@pytest.fixture(scope="module")
def config_error_runs(tiny_imagefolder, tmp_path_factory):
    """TINY with each case of CONFIG_ERRORS, side by side."""
    return side_by_side(tiny_imagefolder, tmp_path_factory, [a for a, _ in CONFIG_ERRORS],
                        check=False)


@pytest.mark.parametrize("args, message", CONFIG_ERRORS)
def test_default_job_config_errors(config_error_runs, args, message):
    _, p = config_error_runs[tuple(args)]
    assert p.returncode == 2 and message in p.stderr, p.stderr
