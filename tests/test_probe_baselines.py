"""probe.py's baselines (a random-init encoder, raw pixels), its centred k-NN (pretrain.py's
protocol) and the cls_norm head (MAE's linear probe): by hand, and end to end on tiny data."""
import functools
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
import probe  # noqa: E402
from common import parse_config  # noqa: E402
from fault_injection import in_parallel  # noqa: E402

TINY = ["dataset=imagefolder", "subset=47", "val_subset=30", "num_workers=0", "batch_size=8",
        "epochs=3", "warmup_epochs=1", "optimizer=sgd", "blr=0.5", "log_every=1", "eval_every=2",
        "knn_k=5", "seed=3"]
ENCODER_ROWS = {"cls", "cls_norm", "mean", "abmilp", "knn_cls", "knn_mean"}


def run(args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, "probe.py", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def results_of(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# cls_norm: [cls] after the final LayerNorm

def test_cls_norm_head_is_the_cls_head_on_final_normed_tokens():
    torch.manual_seed(0)
    vit = M.build_vit("vit_micro", img_size=16, patch_size=4).eval()
    with torch.no_grad():
        vit.norm.weight.normal_()
        vit.norm.bias.normal_()
    x = torch.randn(6, 3, 16, 16)
    before = probe.frozen_tokens(vit, x)                                  # the authors' features
    after = probe.frozen_tokens(vit, x, final_norm=True)                  # MAE's features
    cfg = parse_config(probe.Config, ["heads=[cls, cls_norm]"])
    heads = probe.build_heads(cfg, vit, num_classes=5).train()
    assert not any(p.requires_grad for p in heads["cls_norm"].norm.parameters())
    plain = losses.ProbeHead("cls", 32, 5).train()
    plain.load_state_dict(heads["cls_norm"].probe.state_dict())
    torch.testing.assert_close(heads({"encoder": before})["cls_norm"], plain(after))
    assert not torch.allclose(heads({"encoder": before})["cls"], plain(after))
    # features already after the norm (final_norm=true): cls_norm does not apply it twice
    cfg = parse_config(probe.Config, ["heads=[cls_norm]", "final_norm=true"])
    assert isinstance(probe.build_heads(cfg, vit, 5)["cls_norm"].norm, torch.nn.Identity)


# -----------------------------------------------------------------------------
# k-NN: the bank's mean feature subtracted, as pretrain.knn_top1

def knn_counts(bank, bank_labels, val, val_labels, valid, num_classes, cfg):
    """probe.knn_evaluate of one row, in one process: (correct top-1, correct top-5, images)."""
    every = torch.ones(len(bank_labels), dtype=torch.bool)
    return probe.knn_evaluate(probe.Shard({"row": bank}, bank_labels, every),
                              probe.Shard({"row": val}, val_labels, valid), num_classes, cfg)["row"]


def test_centring_turns_a_wrong_knn_vote_right_by_hand():
    """Bank: class 0 at (10, 1) once, class 1 at (10, -1) three times; query (10, 1), class 0.
    Raw cosines 1 and 0.980: exp(1/0.07) < 3 exp(0.980/0.07), so class 1 wins. Centred (mean
    (10, -0.5)): cosines 1 and -1, so class 0 wins."""
    bank = torch.tensor([[10.0, 1.0], [10.0, -1.0], [10.0, -1.0], [10.0, -1.0]])
    bank_labels = torch.tensor([0, 1, 1, 1])
    query, label, valid = torch.tensor([[10.0, 1.0]]), torch.tensor([0]), torch.tensor([True])
    for centre, want in ((True, 1), (False, 0)):
        cfg = parse_config(probe.Config, ["knn_k=4", f"knn_centre={str(centre).lower()}"])
        top1, _, n = knn_counts(bank, bank_labels, query, label, valid, 2, cfg)
        assert (top1, n) == (want, 1), centre
    raw = 3 * math.exp(99 / math.sqrt(101 * 101) / 0.07)
    assert math.exp(1 / 0.07) < raw                        # the vote above, by hand


def test_probe_knn_equals_pretrain_knn_top1():
    import pretrain
    g = torch.Generator().manual_seed(0)
    bank, val = torch.randn(300, 8, generator=g) + 2.0, torch.randn(200, 8, generator=g) + 2.0
    bank_labels = (bank[:, 0] > 2.0).long() + (bank[:, 1] > 2.0).long()
    val_labels = (val[:, 0] > 2.0).long() + (val[:, 1] > 2.0).long()
    every = torch.ones(200, dtype=torch.bool)
    cfg = parse_config(probe.Config, ["knn_k=20"])
    top1, _, n = knn_counts(bank, bank_labels, val, val_labels, every, 3, cfg)
    assert top1 / n == pytest.approx(pretrain.knn_top1(bank, bank_labels, val, val_labels, 20, 3))
    uncentred = parse_config(probe.Config, ["knn_k=20", "knn_centre=false"])
    other = knn_counts(bank, bank_labels, val, val_labels, every, 3, uncentred)[0]
    assert other != top1                       # the offset of 2 matters without the centring


# -----------------------------------------------------------------------------
# End to end: the baseline rows, and what each equals

@pytest.fixture(scope="module")
def noisy_imagefolder(tmp_path_factory):
    """4 classes of 16 x 16 noise, each a little brighter in its own quadrant: hard enough that
    no row sits at 100%, so rows that should be equal could differ. 48 train, 32 val images."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp("noisy")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 8)):
        for c in range(4):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 200, size=(16, 16, 3)).astype(np.uint8)
                pixels[8 * (c // 2): 8 * (c // 2) + 8, 8 * (c % 2): 8 * (c % 2) + 8] += 25
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.png")
    return str(root)


def heads_of(folder):
    return torch.load(folder / "heads.pth", weights_only=True)["heads"]


@pytest.fixture(scope="module")
def runs(noisy_imagefolder, tmp_path_factory):
    """A micro encoder and a random-init encoder file (seed 3, as the baselines'); probe runs:
    the encoder with and without baselines, and the random-init file on its own."""
    tmp = tmp_path_factory.mktemp("baselines")
    torch.manual_seed(0)
    enc = M.build_vit("vit_micro", img_size=16, patch_size=4)
    with torch.no_grad():  # a trained-looking encoder: not a random init
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.save(M.encoder_state(enc), tmp / "encoder.pth")
    torch.manual_seed(3)
    torch.save(M.encoder_state(M.ViT(enc.cfg)), tmp / "random.pth")
    base = [*TINY, f"data_path={noisy_imagefolder}"]
    cases = {"plain": [f"backbone={tmp / 'encoder.pth'}"],
             "baselines": [f"backbone={tmp / 'encoder.pth'}", "baselines=true"],
             "random_file": [f"backbone={tmp / 'random.pth'}"]}
    # three independent runs, side by side
    done = in_parallel([functools.partial(run, [*base, *extra, f"out_dir={tmp / name}"])
                        for name, extra in cases.items()])
    out = {name: (p.stdout, tmp / name) for name, p in zip(cases, done)}
    return base, tmp, out


def test_baseline_rows_are_labelled_in_the_table_and_results(runs):
    _, _, out = runs
    stdout, folder = out["baselines"]
    res = results_of(folder)
    random_rows = {f"random_{r}" for r in ENCODER_ROWS}
    assert list(res["accuracy"])[:6] == ["cls", "cls_norm", "mean", "abmilp", "knn_cls", "knn_mean"]
    assert set(res["accuracy"]) == ENCODER_ROWS | random_rows | {"pixels_linear", "pixels_knn"}
    assert all(r["images"] == 30 for r in res["results"].values())
    assert len({r["correct_top1"] for r in res["results"].values()}) > 3   # not all saturated
    assert res["protocol"]["tokens"]["random_mean"].startswith("BASELINE random-init encoder")
    assert "seed 3" in res["protocol"]["baselines"]["random"]
    for row in ("random_abmilp", "pixels_linear", "pixels_knn"):
        assert any(line.startswith(row) and "BASELINE" in line for line in stdout.splitlines())
    assert results_of(out["plain"][1])["protocol"]["baselines"] == "off"


def test_encoder_rows_do_not_change_when_baselines_are_added(runs):
    """Same batches, disjoint parameters, per-parameter SGD: the encoder's heads train exactly as
    without the baselines (their trained weights are equal, bit for bit)."""
    _, _, out = runs
    plain, both = results_of(out["plain"][1])["results"], results_of(out["baselines"][1])["results"]
    assert set(plain) == ENCODER_ROWS
    assert {row: both[row] for row in plain} == plain
    plain_heads, both_heads = heads_of(out["plain"][1]), heads_of(out["baselines"][1])
    for key, value in plain_heads.items():
        assert torch.equal(both_heads[key], value), key


def test_random_rows_equal_a_probe_of_the_same_random_init_encoder(runs):
    """Same architecture, seed = cfg.seed, the heads starting from the same weights: the baseline
    rows are exactly what probe.py gives for that random encoder as the backbone."""
    _, _, out = runs
    alone = results_of(out["random_file"][1])["results"]
    both = results_of(out["baselines"][1])["results"]
    assert {row: both[f"random_{row}"] for row in alone} == alone
    alone_heads, both_heads = heads_of(out["random_file"][1]), heads_of(out["baselines"][1])
    for key, value in alone_heads.items():
        assert torch.equal(both_heads[f"random_{key}"], value), key
    plain_heads = heads_of(out["plain"][1])
    assert not torch.equal(plain_heads["cls.fc.weight"], alone_heads["cls.fc.weight"])


def test_pixel_knn_row_equals_a_centred_knn_on_the_images_by_hand(runs, noisy_imagefolder):
    _, _, out = runs
    tf = data.eval_transform(16)
    load = lambda train, n: data.build_dataset(  # noqa: E731
        "imagefolder", noisy_imagefolder, train=train, transform=tf, subset=n)
    bank = torch.stack([img.flatten() for img, _ in load(True, 47)])
    bank_labels = torch.tensor([y for _, y in load(True, 47)])
    val = torch.stack([img.flatten() for img, _ in load(False, 30)])
    val_labels = torch.tensor([y for _, y in load(False, 30)])
    centre = bank.mean(0)
    votes = losses.knn_votes(bank - centre, bank_labels, val - centre, 4, k=5)
    want = int((votes.argmax(1) == val_labels).sum())
    assert results_of(out["baselines"][1])["results"]["pixels_knn"]["correct_top1"] == want


def test_saved_heads_with_baselines_reload_and_reproduce_the_trained_rows(runs):
    """load_heads (what the experiments use) rebuilds every source's heads from heads.pth; on the
    same features (the random-init encoder again from the seed) they give the same counts."""
    base, tmp, out = runs
    cfg = parse_config(probe.Config, [*base, f"backbone={tmp / 'encoder.pth'}", "baselines=true"])
    vit = probe.load_backbone(cfg)
    heads = probe.load_heads(str(out["baselines"][1] / "heads.pth"), cfg, vit, 4)
    val = data.build_dataset("imagefolder", cfg.data_path, train=False,
                             transform=data.eval_transform(16), subset=30)
    one = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"))
    frozen = probe.Frozen(val, probe.feature_sources(cfg, vit), cfg, one, batch=8, cached=False)
    table = probe.results_table(probe.evaluate(heads, frozen.batches()))
    assert set(table) == {"cls", "cls_norm", "mean", "abmilp", "pixels_linear"} | {
        f"random_{row}" for row in ("cls", "cls_norm", "mean", "abmilp")}
    assert table == {row: results_of(out["baselines"][1])["results"][row] for row in table}


def test_baselines_on_the_streaming_path_is_a_one_line_error(runs, tmp_path):
    base, tmp, _ = runs
    p = run([*base, f"backbone={tmp / 'encoder.pth'}", "baselines=true", "cache=never",
             f"out_dir={tmp_path}"], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1
    assert "baselines=true needs the cached path" in lines[0]
