"""Probing beyond [cls]: AbMILP invariants, heads on separable tokens, k-NN and the attention
statistics checked by hand, timm / MAE weights, and a 2-process gloo evaluation equal to
1 process."""
import argparse
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
from common import ConfigError, parse_config  # noqa: E402
from experiments import attention_analysis as AA  # noqa: E402

TINY = ["dataset=imagefolder", "subset=31", "val_subset=7", "num_workers=0", "batch_size=8",
        "epochs=3", "warmup_epochs=1", "optimizer=sgd", "blr=0.5", "log_every=1", "eval_every=2",
        "knn_k=5"]


def run(args, nproc=1, check=True, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "probe.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=29541", "probe.py", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


# -----------------------------------------------------------------------------
# AbMILP

ABMILP_OPTIONS = [{}, {"depth": 3, "activation": "relu"}, {"self_attn": "map"},
                  {"self_attn": "both"}, {"depth": 2, "pos_embed": True, "grid": 4}]


@pytest.mark.parametrize("options", ABMILP_OPTIONS)
def test_abmilp_attention_sums_to_one(options):
    torch.manual_seed(0)
    z, a = losses.AbMILP(16, **options)(torch.randn(3, 16, 16))
    assert z.shape == (3, 16) and a.shape == (3, 16)
    assert (a >= 0).all()
    torch.testing.assert_close(a.sum(-1), torch.ones(3))


@pytest.mark.parametrize("options", [o for o in ABMILP_OPTIONS if not o.get("pos_embed")])
def test_abmilp_pooling_is_invariant_to_patch_order(options):
    torch.manual_seed(0)
    pool = losses.AbMILP(16, **options)
    x = torch.randn(2, 16, 16)
    perm = torch.randperm(16)
    z, a = pool(x)
    z_perm, a_perm = pool(x[:, perm])
    torch.testing.assert_close(z_perm, z)
    torch.testing.assert_close(a_perm, a[:, perm])


def test_abmilp_position_term_breaks_the_invariance():
    torch.manual_seed(0)
    pool = losses.AbMILP(16, pos_embed=True, grid=4)
    x = torch.randn(2, 16, 16)
    assert not torch.allclose(pool(x.flip(1))[0], pool(x)[0])


def test_abmilp_with_a_scorer_that_singles_out_one_token_returns_that_token():
    torch.manual_seed(0)
    pool = losses.AbMILP(8)
    with torch.no_grad():  # s(x) = 1 * x_0: only feature 0 counts
        pool.scorer[-1].weight.zero_()
        pool.scorer[-1].weight[0, 0] = 1.0
        pool.scorer[-1].bias.zero_()
    x = torch.randn(3, 10, 8) * 0.1
    chosen = torch.tensor([2, 7, 0])
    x[torch.arange(3), chosen, 0] = 50.0
    z, a = pool(x)
    torch.testing.assert_close(a.argmax(-1), chosen)
    torch.testing.assert_close(z, x[torch.arange(3), chosen])


# -----------------------------------------------------------------------------
# Heads, optimizers, k-NN

def separable_tokens(n, num_classes=4, N=9, D=16, seed=0):
    """Tokens (n, 1+N, D) whose [cls] and patches all carry a class mean, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, D, generator=torch.Generator().manual_seed(123)) * 2
    labels = torch.randint(0, num_classes, (n,), generator=g)
    tokens = means[labels].unsqueeze(1) + 0.5 * torch.randn(n, 1 + N, D, generator=g)
    return probe.Shard({"encoder": tokens}, labels, torch.ones(n, dtype=torch.bool))


# LARS scales each matrix step to 0.001 ||w|| (MAE's lr 6.4 at batch 16384): more steps than SGD
@pytest.mark.parametrize("optimizer, epochs", [("sgd", 5), ("lars", 20)])
def test_each_head_and_knn_reach_near_perfect_accuracy_on_separable_tokens(optimizer, epochs):
    torch.manual_seed(0)
    train, val = separable_tokens(256, seed=0), separable_tokens(128, seed=1)
    heads = probe.Heads({p: losses.ProbeHead(p, 16, 4) for p in ["cls", "mean", "abmilp"]})
    if optimizer == "lars":
        opt = probe.LARS(heads.parameters(), lr=6.4)
    else:
        opt = torch.optim.SGD(heads.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(epochs):
        heads.train()
        gen = torch.Generator().manual_seed(epoch)
        for tokens, labels in train.shuffled(32, gen):
            loss, _ = losses.probe_loss(heads(tokens), labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
    counts = probe.evaluate(heads, val.batches(50))
    cfg = parse_config(probe.Config, ["knn_k=5", "knn=[cls, mean]"])
    bank = probe.Shard(probe.knn_keep(train.feats, cfg), train.labels, train.valid)
    feats = probe.Shard(probe.knn_keep(val.feats, cfg), val.labels, val.valid)
    counts.update(probe.knn_evaluate(bank, feats, 4, cfg))
    assert set(counts) == {"cls", "mean", "abmilp", "knn_cls", "knn_mean"}
    for name, (top1, top5, n) in counts.items():
        assert n == 128 and top1 >= 0.97 * n and top5 == n, (name, top1, top5)


def test_lars_step_matches_the_mae_formula():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))      # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = probe.LARS([w, b], lr=2.0, momentum=0.9)
    w.grad, b.grad = torch.tensor([[0.0, 10.0]]), torch.tensor([0.5])
    opt.step()  # matrix: lr * 0.001 * ||w|| / ||g|| * g; vector: plain SGD
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0, 4.0 - 2.0 * 0.001 * 5 / 10 * 10]]))
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 2.0 * 0.5]))


def test_knn_votes_by_hand_and_top5_with_fewer_than_5_classes():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 2.0], [-1.0, 0.0]])
    bank_labels = torch.tensor([0, 1, 2, 0])
    feats = torch.tensor([[3.0, 0.0]])  # cosine similarities 1, 0.8, 0, -1: the 3 nearest vote
    T = 0.07
    want = torch.tensor([[math.exp(1 / T), math.exp(0.8 / T), math.exp(0 / T), 0.0]])
    for chunk in (1, 1024):
        votes = losses.knn_votes(bank, bank_labels, feats, num_classes=4, k=3, temperature=T,
                                 chunk=chunk)
        torch.testing.assert_close(votes, want)
    # 4 classes: top-5 is top-4, and class 3 got no vote, so it is never a guess
    # (DINO would count it)
    scores = want.log().expand(4, -1)
    top1, top5 = losses.topk_correct(scores, torch.tensor([0, 1, 2, 3]))
    assert top1.tolist() == [True, False, False, False]
    assert top5.tolist() == [True, True, True, False]
    # k larger than the bank: every training feature votes
    votes = losses.knn_votes(bank, bank_labels, feats, num_classes=4, k=20, temperature=T)
    torch.testing.assert_close(votes[0, 0], torch.tensor(math.exp(1 / T) + math.exp(-1 / T)))


def test_topk_correct_clips_k_to_the_number_of_classes():
    logits = torch.tensor([[0.1, 0.9, 0.5], [2.0, -1.0, 0.0]])
    top1, top5 = losses.topk_correct(logits, torch.tensor([2, 1]))
    assert top1.tolist() == [False, False] and top5.tolist() == [True, True]


# -----------------------------------------------------------------------------
# Backbone features and weights

def test_frozen_tokens_are_the_blocks_outputs():
    torch.manual_seed(0)
    vit = M.build_vit("vit_micro", depth=3, img_size=16, patch_size=4, shared_rel_pos_bias=True,
                      rel_pos_bias=True, layer_scale=0.1).eval()
    x = torch.randn(2, 3, 16, 16)
    out, layers = vit.forward_intermediates(x)
    torch.testing.assert_close(probe.frozen_tokens(vit, x, -1, final_norm=True), out)
    torch.testing.assert_close(probe.frozen_tokens(vit, x, -1), layers.pre_norm)
    torch.testing.assert_close(probe.frozen_tokens(vit, x, 0), layers.residual[1])


def test_timm_and_mae_weights_load_strictly(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ViT = timm.models.vision_transformer.VisionTransformer
    ref = ViT(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    timm_file = str(tmp_path / "timm.pth")
    torch.save(ref.state_dict(), timm_file)
    arch = ["backbone_format=timm", "model=vit_micro", "patch_size=4", "img_size=16"]
    x = torch.randn(2, 3, 16, 16)
    vit = probe.load_backbone(parse_config(probe.Config, [f"backbone={timm_file}", *arch]))
    assert not vit.training and not any(p.requires_grad for p in vit.parameters())
    with torch.no_grad():
        tokens = probe.frozen_tokens(vit, x, -1, final_norm=True)
        torch.testing.assert_close(tokens, ref.forward_features(x))
    # MAE's format: {'model': encoder + decoder (its own mask token), 'args': Namespace}
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("head.")}
    decoder = {"mask_token": torch.zeros(1, 1, 24), "decoder_embed.weight": torch.zeros(24, 32)}
    mae = {"model": {**sd, **decoder}, "args": argparse.Namespace(blr=1e-3)}
    mae_file = str(tmp_path / "mae.pth")
    torch.save(mae, mae_file)
    vit = probe.load_backbone(parse_config(probe.Config, [f"backbone={mae_file}", *arch]))
    fc2 = "blocks.1.mlp.fc2.weight"
    torch.testing.assert_close(vit.state_dict()[fc2], sd[fc2])
    with pytest.raises(ConfigError, match="does not fit"):
        bigger = [f"backbone={timm_file}", *arch[:-1], "img_size=32"]
        probe.load_backbone(parse_config(probe.Config, bigger))


# -----------------------------------------------------------------------------
# The attention statistics

def test_attention_stats_equal_hand_computed_values():
    """1 block, q = k = 0 (uniform attention over 1+N = 5 tokens), v = b, proj = identity:
    the attention output is b for every token; the residual is c for [cls] and p for patches."""
    vit = M.build_vit("vit_micro", depth=1, img_size=8, patch_size=4, pos_embed="none").eval()
    D = 32
    c, p, b = torch.randn(D), torch.randn(D), torch.randn(D)
    with torch.no_grad():
        for param in vit.parameters():
            param.zero_()
        vit.cls_token.copy_(c)
        vit.patch_embed.proj.bias.copy_(p)
        vit.blocks[0].attn.qkv.bias[2 * D:] = b
        vit.blocks[0].attn.proj.weight.copy_(torch.eye(D))
    [row] = AA.information_flow(vit, torch.randn(3, 3, 8, 8))
    want = {"block": 0, "cls_to_cls": 1 / 5, "cls_to_patches": 4 / 5, "cls_entropy": math.log(4),
            "patch_entropy": math.log(5), "cls_norm_ratio": (b.norm() / c.norm()).item(),
            "patch_norm_ratio": (b.norm() / p.norm()).item()}
    assert row == pytest.approx(want, rel=1e-5)


def test_attention_stats_equal_a_loop_over_images_and_heads():
    torch.manual_seed(0)
    vit = M.build_vit("vit_micro", depth=1, img_size=8, patch_size=4).eval()
    with torch.no_grad():  # sharper attention than at init
        vit.blocks[0].attn.qkv.weight.mul_(40)
    x = torch.randn(2, 3, 8, 8)
    [row] = AA.information_flow(vit, x)
    blk, H = vit.blocks[0], 2
    tokens = vit.embed(x)                                          # (B, 5, 32)
    sums = dict.fromkeys(AA.STATS, 0.0)
    for i in range(2):
        qkv = blk.norm1(tokens[i]) @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
        q, k, v = qkv.chunk(3, dim=-1)
        heads_out = []
        for h in range(H):
            s = slice(16 * h, 16 * (h + 1))
            A = ((q[:, s] @ k[:, s].T) / 4.0).softmax(-1)          # (5, 5)
            heads_out.append(A @ v[:, s])
            cls = A[0, 1:] / A[0, 1:].sum()
            sums["cls_to_cls"] += A[0, 0].item() / (2 * H)
            sums["cls_to_patches"] += A[0, 1:].sum().item() / (2 * H)
            sums["cls_entropy"] += -(cls * cls.log()).sum().item() / (2 * H)
            sums["patch_entropy"] += -(A[1:] * A[1:].log()).sum(-1).mean().item() / (2 * H)
        out = blk.attn.proj(torch.cat(heads_out, dim=-1))
        ratio = out.norm(dim=-1) / tokens[i].norm(dim=-1)
        sums["cls_norm_ratio"] += ratio[0].item() / 2
        sums["patch_norm_ratio"] += ratio[1:].mean().item() / 2
    assert row == pytest.approx({"block": 0, **sums}, rel=1e-4)


# -----------------------------------------------------------------------------
# End to end: 1 and 2 processes (gloo) give the same k-NN; heads trained on 2 evaluate the same in 1

@pytest.mark.parametrize("n, world", [(7, 2), (31, 2), (10, 3), (2, 4), (5, 1)])
def test_frozen_valid_marks_each_image_exactly_once(n, world):
    """The positions Frozen.valid keeps, over all ranks, are every image once
    (DistributedSampler's pads dropped)."""
    cfg = parse_config(probe.Config, ["num_workers=0"])
    kept = []
    for rank in range(world):
        dist = SimpleNamespace(world=world, rank=rank, device=torch.device("cpu"))
        frozen = probe.Frozen(list(range(n)), {}, cfg, dist, batch=4, cached=False)
        order = list(frozen.loader.sampler)
        assert len(frozen.valid) == len(order)
        kept += [i for i, ok in zip(order, frozen.valid.tolist()) if ok]
    assert sorted(kept) == list(range(n))


@pytest.fixture(scope="module")
def trained(tiny_imagefolder, tmp_path_factory):
    """A micro encoder file and a 1-process probe run on 31 train / 7 val images (uneven shards)."""
    tmp = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    vit = M.build_vit("vit_micro", img_size=16, patch_size=4)
    torch.save(M.encoder_state(vit), tmp / "encoder.pth")
    args = [*TINY, f"data_path={tiny_imagefolder}", f"backbone={tmp / 'encoder.pth'}"]
    p = run([*args, f"out_dir={tmp / 'one'}"])
    return args, tmp, p.stdout


def results_of(out_dir):
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def test_one_process_probe_writes_results_with_the_protocol(trained):
    args, tmp, stdout = trained
    assert "path: cached" in stdout
    out = results_of(tmp / "one")
    assert set(out["accuracy"]) == {"cls", "cls_norm", "mean", "abmilp", "knn_cls", "knn_mean"}
    assert all(r["images"] == 7 for r in out["results"].values())
    proto = out["protocol"]
    assert proto["block"] == 1 and proto["final_norm"] is False and proto["path"] == "cached"
    assert "eval()" in proto["backbone_mode"] and proto["train_images"] == 31
    assert os.path.isfile(tmp / "one" / "heads.pth")


@pytest.mark.parametrize("cache", ["always", "never"])
def test_two_process_gloo_knn_counts_equal_one_process(trained, cache):
    """7 val images on 2 ranks: DistributedSampler pads rank 1 with a duplicate, which must not
    count; the k-NN bank (31 images) is padded too. Cached and streaming evaluation both."""
    args, tmp, _ = trained
    out = tmp / f"two_{cache}"
    p = run([*args, f"out_dir={out}", "heads=[]", f"cache={cache}"], nproc=2)
    assert "world size 2" in p.stdout
    one, two = results_of(tmp / "one")["results"], results_of(out)["results"]
    assert two == {row: one[row] for row in ("knn_cls", "knn_mean")}
    assert two["knn_cls"]["images"] == 7


def test_two_process_training_with_accumulation_evaluates_as_one_process(trained, tmp_path):
    """The heads trained on 2 ranks, evaluated there over padded shards, give the same counts as
    the saved heads evaluated again here in one process."""
    args, _, _ = trained
    p = run([*args, f"out_dir={tmp_path}", "accum_steps=2", "epochs=2"], nproc=2)
    assert "micro-batch 2 per process, 2 accumulation step(s)" in p.stdout
    out = results_of(tmp_path)
    assert out["protocol"]["world_size"] == 2
    assert all(r["images"] == 7 for r in out["results"].values())
    cfg = parse_config(probe.Config, args)
    vit = probe.load_backbone(cfg)
    val = data.build_dataset(cfg.dataset, cfg.data_path, train=False,
                             transform=data.eval_transform(vit.cfg.img_size), subset=cfg.val_subset)
    heads = probe.load_heads(str(tmp_path / "heads.pth"), cfg, vit, probe.num_classes_of(val))
    one = SimpleNamespace(world=1, rank=0, device=torch.device("cpu"))
    frozen = probe.Frozen(val, probe.feature_sources(cfg, vit), cfg, one, batch=8, cached=False)
    table = probe.results_table(probe.evaluate(heads, frozen.batches()))
    assert table == {row: out["results"][row] for row in table}


def test_streaming_path_trains_and_a_rerun_resumes(trained, tmp_path):
    args, _, _ = trained
    streaming = [*args, f"out_dir={tmp_path}", "cache=never", "epochs=2", "block=0",
                 "final_norm=true"]
    first = run(streaming)
    assert "path: streaming" in first.stdout
    before = results_of(tmp_path)
    proto = before["protocol"]
    assert proto["path"] == "streaming" and proto["block"] == 0 and proto["final_norm"] is True
    again = run(streaming)
    assert "resumed from" in again.stdout
    assert results_of(tmp_path)["results"] == before["results"]  # the saved heads, evaluated again


def test_analysis_writes_csv_and_pngs(trained):
    args, tmp, _ = trained
    AA.main([*args, f"out_dir={tmp / 'one'}", "num_images=7", "map_images=3"])
    folder = tmp / "one" / "analysis"
    with open(folder / "attention_stats.csv") as f:
        lines = f.read().splitlines()
    assert lines[0].split(",") == ["block", *AA.STATS] and len(lines) == 1 + 2
    for name in ("attention_stats.png", "attention_maps.png"):
        assert (folder / name).stat().st_size > 1000


# -----------------------------------------------------------------------------
# Configs and bad input

PROBE_CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs"))
                       if f.endswith("_probe.yaml"))


@pytest.mark.parametrize("name", PROBE_CONFIGS)
def test_every_probe_config_parses(name):
    cfg = parse_config(probe.Config, ["--config", os.path.join(ROOT, "configs", name)])
    assert cfg.heads and cfg.epochs >= 1


@pytest.mark.parametrize("args, message", [
    (["heads=[cls, attn]"], "config key 'heads' must be one of"),
    (["knn=[abmilp]"], "config key 'knn' must be one of"),
    (["cache=off"], "config key 'cache' must be str"),   # YAML reads off as false
    (["heads=[]", "knn=[]"], "nothing to evaluate"),
])
def test_bad_config_is_a_clear_error(args, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_config(probe.Config, args)


def test_missing_backbone_is_a_one_line_error(tmp_path):
    p = run([f"backbone={tmp_path / 'none.pth'}", f"out_dir={tmp_path}"], check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1
    assert "config key 'backbone'" in lines[0] and "does not exist" in lines[0]
