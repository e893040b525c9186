"""Masked Token Optimization with SimMIM and MAE: Eqs. 1-6, the models, the loop, the tools."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import data
import losses
import model as M
import pretrain
from common import ConfigError, parse_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["dataset=imagefolder", "model=vit_micro", "img_size=16", "patch_size=4", "num_workers=0",
        "batch_size=8", "epochs=2", "warmup_epochs=1", "log_every=1", "blr=1e-3"]
SIMMIM = ["framework=simmim", "mask=simmim", "mask_ratio=0.6", "mask_patch_size=8",
          "pos_embed=none", "shared_rel_pos_bias=true"]
MAE = ["framework=mae", "mask=random", "mask_ratio=0.75", "pos_embed=sincos", "layer_scale=0.0",
       "decoder_dim=32", "decoder_depth=2", "decoder_heads=2", "clip_grad=0.0"]


def exact_mask(batch, num_patches, num_masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    return data.random_mask(batch, num_patches, num_masked, generator=g)


def entropy(p):
    return -sum(v * math.log(v) for v in p)


def softmax(logits):
    z = [math.exp(v) for v in logits]
    return [v / sum(z) for v in z]


# -----------------------------------------------------------------------------
# Eq. 2: heterogeneity

def test_heterogeneity_hand_computed():
    # 3 patches in 2-d: patch 0 masked, patches 1 and 2 visible; logits x_0 . x_j / sqrt(2)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, False, False]])
    p = softmax([1 / math.sqrt(2), 0.0])                              # A = [0.6698, 0.3302]
    assert losses.heterogeneity(x, mask).item() == pytest.approx(entropy(p), abs=1e-6)
    assert entropy(p) == pytest.approx(0.634347, abs=1e-6)
    # two masked rows: H is their mean; rows in X_M order, columns over X_V only
    x = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False, True, False]])                 # X_M = {0, 2}, X_V = {1, 3}
    rows = [softmax([0.0, 0.0]), softmax([1 / math.sqrt(2), 0.0])]
    expected = sum(map(entropy, rows)) / 2
    assert losses.heterogeneity(x, mask).item() == pytest.approx(expected, abs=1e-6)


def test_heterogeneity_lies_in_0_log_v_and_reaches_log_v_for_identical_visible_tokens():
    torch.manual_seed(0)
    B, N, D, num_masked = 4, 16, 8, 10
    mask = exact_mask(B, N, num_masked)
    x = torch.randn(B, N, D) * 3
    H = losses.heterogeneity(x, mask)
    assert H.shape == (B,)
    assert (H >= 0).all() and (H <= math.log(N - num_masked) + 1e-6).all()
    same = torch.where(mask.unsqueeze(-1), x, torch.randn(1, 1, D))   # all visible tokens alike
    log_v = torch.full((B,), math.log(N - num_masked))
    assert torch.allclose(losses.heterogeneity(same, mask), log_v, atol=1e-5)
    # the batch is vectorised: each image alone gives the same value
    for b in range(B):
        one = losses.heterogeneity(x[b:b + 1], mask[b:b + 1]).item()
        assert one == pytest.approx(H[b].item(), abs=1e-6)


def test_heterogeneity_rejects_cls_and_uneven_masks():
    x = torch.randn(2, 17, 8)
    mask = exact_mask(2, 16, 4)
    with pytest.raises(ValueError, match=r"without \[cls\]"):
        losses.heterogeneity(x, mask)
    mask[0, mask[0].logical_not().nonzero()[0]] = True                 # image 0 gets one more
    with pytest.raises(ValueError, match="same number of masked patches"):
        losses.heterogeneity(x[:, 1:], mask)


# -----------------------------------------------------------------------------
# Eqs. 3-5: L_spa, L_e, L_r

def test_sparsity_loss_hand_computed():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, False, False]])
    s = 1 / math.sqrt(2)  # rows of the visible tokens 1, 2 over all three tokens
    rows = [softmax([s, s, 0.0]), softmax([0.0, 0.0, s])]
    expected = sum(map(entropy, rows)) / 2
    assert losses.sparsity_loss(x, mask).item() == pytest.approx(expected, abs=1e-6)


def test_sparsity_loss_without_the_diagonal_hand_computed():
    # the same 3 tokens; each visible row leaves out its own column:
    # token 1 sees tokens 0 and 2 (logits s, 0); token 2 sees tokens 0 and 1 (logits 0, 0)
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    mask = torch.tensor([[True, False, False]])
    s = 1 / math.sqrt(2)
    expected = (entropy(softmax([s, 0.0])) + math.log(2)) / 2
    got = losses.sparsity_loss(x, mask, exclude_self=True).item()
    assert got == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx((0.634347 + 0.693147) / 2, abs=1e-6)
    # the switch does not touch the default: the printed formula keeps the diagonal
    rows = [softmax([s, s, 0.0]), softmax([0.0, 0.0, s])]
    default = losses.sparsity_loss(x, mask).item()
    assert default == pytest.approx(sum(map(entropy, rows)) / 2, abs=1e-6)


def test_sparsity_loss_self_weight_dominates_normed_tokens_unless_excluded():
    # Issue 13.5: with LayerNorm'd tokens the self logit is sqrt(D) (= 13.9 at D = 192) and the
    # others are ~N(0, 1), so each row's softmax sits on itself and L_spa ~ 0 from the start.
    # Without the diagonal the rows spread over the other N - 1 tokens (entropy near log(N - 1)).
    torch.manual_seed(0)
    B, N, D = 4, 49, 192
    x = F.layer_norm(torch.randn(B, N, D), (D,))
    mask = exact_mask(B, N, 19)
    with_self = losses.sparsity_loss(x, mask).item()
    without = losses.sparsity_loss(x, mask, exclude_self=True).item()
    assert with_self < 0.01
    assert 0.5 * math.log(N - 1) < without <= math.log(N - 1)


def test_sparsity_loss_without_the_diagonal_has_finite_gradients_and_reaches_mto_losses():
    torch.manual_seed(2)
    B, N, D = 2, 16, 8
    mask = exact_mask(B, N, 9)
    hiddens = [torch.randn(B, N, D, requires_grad=True) for _ in range(3)]
    terms = losses.mto_losses(hiddens, mask, exclude_self=True)
    spa = losses.sparsity_loss(hiddens[0], mask, exclude_self=True)
    assert terms["spa"].item() == pytest.approx(spa.item(), rel=1e-6)
    assert terms["spa"].item() != pytest.approx(losses.sparsity_loss(hiddens[0], mask).item())
    terms["spa"].backward()
    assert torch.isfinite(hiddens[0].grad).all() and hiddens[0].grad.abs().sum() > 0


def test_entropy_and_ranking_loss_on_hand_made_sequences():
    H = torch.tensor([[2.0, 1.0], [1.5, 1.0], [1.7, 0.5]])  # (L+1, B): H^0..H^2 of 2 images
    expected = (1 / (2 + 1e-6) + 1 / (1 + 1e-6)) / 2
    assert losses.entropy_loss(H[0]).item() == pytest.approx(expected, rel=1e-6)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    falling = (sp(1.5 - 2.0) + sp(1.7 - 1.5) + sp(1.0 - 1.0) + sp(0.5 - 1.0)) / 2  # H^l - H^{l-1}
    printed = (sp(2.0 - 1.5) + sp(1.5 - 1.7) + sp(1.0 - 1.0) + sp(1.0 - 0.5)) / 2  # H^{l-1} - H^l
    assert losses.ranking_loss(H).item() == pytest.approx(falling, rel=1e-6)
    assert losses.ranking_loss(H, printed_sign=True).item() == pytest.approx(printed, rel=1e-6)
    # one image, H of shape (L+1,), works too
    assert losses.ranking_loss(H[:, 0]).item() == pytest.approx(sp(-0.5) + sp(0.2), rel=1e-6)


def violations(H, printed_sign=False):
    step = H[1:] - H[:-1]                      # the chosen order is falling; printed: rising
    return F.relu(-step if printed_sign else step).sum().item()


@pytest.mark.parametrize("printed_sign", [False, True])
def test_one_step_on_ranking_loss_reduces_violations_of_the_chosen_order(printed_sign):
    torch.manual_seed(1)
    B, N, D, L = 3, 16, 8, 5
    mask = exact_mask(B, N, 8)
    scales = torch.tensor([0.5, 2.0, 0.7, 1.8, 0.4, 1.5])             # erratic H across layers
    hiddens = [torch.nn.Parameter(torch.randn(B, N, D) * s) for s in scales[:L + 1]]
    H = torch.stack([losses.heterogeneity(x, mask) for x in hiddens])
    before = violations(H.detach(), printed_sign)
    assert before > 0.1
    losses.ranking_loss(H, printed_sign).backward()
    with torch.no_grad():
        for x in hiddens:
            x -= 10.0 * x.grad                                           # plain gradient descent
    H = torch.stack([losses.heterogeneity(x, mask) for x in hiddens]).detach()
    assert violations(H, printed_sign) < 0.95 * before


def test_mto_losses_terms_and_gradients():
    torch.manual_seed(0)
    B, N, D, L = 2, 16, 8, 3
    mask = exact_mask(B, N, 9)
    hiddens = [torch.randn(B, N, D, requires_grad=True) for _ in range(L + 1)]
    terms = losses.mto_losses(hiddens, mask)
    assert set(terms) == {"spa", "e", "r"}
    assert all(t.dim() == 0 and torch.isfinite(t) for t in terms.values())
    H = torch.stack([losses.heterogeneity(x, mask) for x in hiddens])
    assert terms["e"].item() == pytest.approx(losses.entropy_loss(H[0]).item(), rel=1e-6)
    assert terms["r"].item() == pytest.approx(losses.ranking_loss(H).item(), rel=1e-6)
    spa = losses.sparsity_loss(hiddens[0], mask).item()
    assert terms["spa"].item() == pytest.approx(spa, rel=1e-6)
    sum(terms.values()).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in hiddens)
    printed = losses.mto_losses(hiddens, mask, printed_sign=True)
    r = losses.ranking_loss(H, printed_sign=True).item()
    assert printed["r"].item() == pytest.approx(r, rel=1e-6)


# -----------------------------------------------------------------------------
# Eq. 6: RAUC

def test_rauc_trapezoid_values_and_errors():
    s1 = [(1, 0.5), (2, 0.6), (3, 0.7)]
    s2 = [(1, 0.55), (2, 0.68), (3, 0.72)]
    # numerator: (0.05 + 0.18) / 2 + (0.18 + 0.22) / 2 = 0.315; denominator: 0.05 + 0.15 = 0.2
    assert losses.rauc(s1, s2, 1, 3) == pytest.approx(0.315 / 0.2)
    assert losses.rauc(s1, s1, 1, 3) == pytest.approx(1.0)
    # curves sampled at different epochs are linear in between: S2 at 1.5 is 0.6
    uneven = losses.rauc([(1, 0.5), (3, 0.7)], [(1, 0.5), (1.5, 0.6), (3, 0.6)], 1, 3)
    assert uneven == pytest.approx((0.5 * 0.1 / 2 + 1.5 * 0.1) / (2 * 0.2 / 2))
    with pytest.raises(ValueError, match="no extrapolation"):
        losses.rauc(s1, s2, 0, 3)
    with pytest.raises(ValueError, match="undefined"):
        losses.rauc([(1, 0.5), (3, 0.5)], s2, 1, 3)
    with pytest.raises(ValueError, match="E1 < E2"):
        losses.rauc(s1, s2, 3, 1)


# The MTO paper's Table 2: linear-probe top-1 at 400 and 800 epochs, (S1, S2) = (baseline,
# + MTO), and the RAUC(S1, S2; 400, 800) the paper prints for them.
TABLE_2 = {
    "MAE ViT-L": ([(400, 68.5), (800, 72.7)], [(400, 72.8), (800, 74.1)], 1.20),
    "MAE ViT-B": ([(400, 57.4), (800, 63.9)], [(400, 63.6), (800, 64.8)], 1.23),
    "BootMAE ViT-B": ([(400, 63.8), (800, 65.4)], [(400, 66.1), (800, 66.8)], 1.22),
    "ConMIM ViT-B": ([(400, 32.2), (800, 39.2)], [(400, 38.7), (800, 40.3)], 1.20),
}


@pytest.mark.parametrize("name", sorted(TABLE_2))
def test_rauc_on_the_papers_own_table_2_points_is_not_the_printed_value(name):
    # The finding in DECISIONS.md: Eq. 6 as printed, with the curve linear between its two
    # points, gives (mean(S2) - S1(400)) / (mean(S1) - S1(400)); by hand for MAE ViT-L:
    # (73.45 - 68.5) / (70.6 - 68.5) = 2.357, where the paper prints 1.20.
    s1, s2, printed = TABLE_2[name]
    by_hand = ((s2[0][1] + s2[1][1]) / 2 - s1[0][1]) / ((s1[0][1] + s1[1][1]) / 2 - s1[0][1])
    value = losses.rauc(s1, s2, 400, 800)
    assert value == pytest.approx(by_hand, rel=1e-12)
    assert round(value, 2) == {"MAE ViT-L": 2.36, "MAE ViT-B": 2.09, "BootMAE ViT-B": 3.31,
                               "ConMIM ViT-B": 2.09}[name]
    assert value > 1.5 * printed


def test_rauc_command(tmp_path, capsys):
    from experiments import rauc as tool
    for name, curve in (("a", [0.5, 0.6, 0.7]), ("b", [0.55, 0.68, 0.72])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for e, acc in enumerate(curve, start=1):
                f.write(json.dumps({"epoch": e, "step": 10 * e, "loss": 1.0}) + "\n")
                f.write(json.dumps({"epoch": e, "knn_top1": acc}) + "\n")
    tool.main([f"baseline={tmp_path / 'a.jsonl'}", f"method={tmp_path / 'b.jsonl'}"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["rauc"] == pytest.approx(1.575) and (result["e1"], result["e2"]) == (1, 3)
    # every printed RAUC says it is not on the paper's scale
    assert lines[-2] == tool.CAVEAT == result["note"] and "not comparable" in tool.CAVEAT


# -----------------------------------------------------------------------------
# SimMIM mask

def test_simmim_mask_exact_count_in_whole_cells():
    g = torch.Generator().manual_seed(0)
    for grid, cell, ratio in ((14, 2, 0.6), (8, 2, 0.6), (8, 4, 0.5)):
        num_cells = data.simmim_num_cells(grid, cell, ratio)
        m = data.simmim_mask(grid, cell, num_cells, generator=g).view(grid, grid)
        assert m.sum() == num_cells * cell ** 2
        cells = m.view(grid // cell, cell, grid // cell, cell)
        assert (cells.all(dim=(1, 3)) == cells.any(dim=(1, 3))).all()  # each cell all or nothing
    assert data.simmim_num_cells(14, 2, 0.6) == 30       # SimMIM at 224: 30 of 49 cells


def test_masked_images_simmim_is_seeded_per_sample():
    base = [(torch.zeros(3, 16, 16), 0)] * 6
    ds = data.MaskedImages(base, grid=4, mask_ratio=0.6, mask="simmim", seed=3, mask_cell=2)
    assert ds.num_masked == 12                                        # ceil(0.6 * 4) = 3 cells of 4
    masks = [ds[i][1] for i in range(6)]
    assert all(m.sum() == 12 for m in masks) and len({tuple(m.tolist()) for m in masks}) > 1
    again = data.MaskedImages(base, 4, 0.6, "simmim", seed=3, mask_cell=2)
    assert torch.equal(ds[2][1], again[2][1])


def test_seeded_draws_as_manual_seed_and_leaves_the_global_generator_alone():
    """data.seeded(s) = fork_rng + torch.manual_seed(s) for the CPU, so samples stay the same
    and the training loop's own random stream is untouched."""
    torch.manual_seed(123)
    expected_next = torch.rand(4)
    torch.manual_seed(123)
    with data.seeded(7):
        drawn = torch.rand(5)
    assert torch.equal(drawn, torch.rand(5, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.rand(4), expected_next)                # the outer stream goes on
    before = torch.get_rng_state()
    with pytest.raises(ValueError), data.seeded(7):
        torch.rand(3)
        raise ValueError
    assert torch.equal(torch.get_rng_state(), before)               # restored on an error too


# -----------------------------------------------------------------------------
# The models

def tiny_cfg(framework, **kw):
    args = TINY + (SIMMIM if framework == "simmim" else MAE) + [f"{k}={v}" for k, v in kw.items()]
    return parse_config(pretrain.Config, args)


def build(framework, **kw):
    torch.manual_seed(0)
    cfg = tiny_cfg(framework, **kw)
    return pretrain.build_mim(cfg, pretrain.build_encoder(cfg)), cfg


def batch(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)
    N = (cfg.img_size // cfg.patch_size) ** 2
    return img, exact_mask(B, N, data.num_masked_patches(N, cfg.mask_ratio), seed)


def patch_pixels(img, j, p=4):
    """The pixel block of patch j in a (B, C, 16, 16) batch (4 x 4 patches)."""
    r, c = divmod(j, img.shape[-1] // p)
    return img[..., r * p:(r + 1) * p, c * p:(c + 1) * p]


@pytest.mark.parametrize("framework", ["simmim", "mae"])
def test_loss_counts_masked_patches_only(framework):
    net, cfg = build(framework)
    img, mask = batch(cfg)
    pred = net(img, mask)[0].detach()
    loss = pretrain.reconstruction_loss(cfg, pred, img, mask)
    visible, masked = (~mask[0]).nonzero()[0, 0].item(), mask[0].nonzero()[0, 0].item()
    changed, g = img.clone(), torch.Generator().manual_seed(1)
    # not a constant: MAE normalises patches
    noise = lambda: torch.randn(3, 4, 4, generator=g) * 5  # noqa: E731
    patch_pixels(changed, visible)[0] += noise()                 # a visible patch's target pixels
    assert pretrain.reconstruction_loss(cfg, pred, changed, mask).item() == loss.item()
    patch_pixels(changed, masked)[0] += noise()                  # a masked patch's
    assert pretrain.reconstruction_loss(cfg, pred, changed, mask).item() != loss.item()
    loss = pretrain.reconstruction_loss(cfg, pred.requires_grad_(), img, mask)
    grad = torch.autograd.grad(loss, pred)[0]
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().sum() > 0


def test_patchify_matches_mae_order():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    x = M.patchify(img, 4)                                              # (2, 4, 48)
    ref = torch.einsum("nchpwq->nhwpqc", img.reshape(2, 3, 2, 4, 2, 4))  # MAE's patchify
    ref = ref.reshape(2, 4, 48)
    assert torch.equal(x, ref)


def test_mae_encoder_never_sees_masked_tokens():
    net, cfg = build("mae")
    img, mask = batch(cfg)
    num_visible = int((~mask[0]).sum())
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for blk in net.encoder.blocks]
    _, keep = M.mask_ids(mask)
    latent = net.encoder(img, keep=keep)
    for h in hooks:
        h.remove()
    assert latent.shape == (3, 1 + num_visible, 32)
    assert seen == [1 + num_visible] * len(net.encoder.blocks)
    # the same as running the blocks on [cls] + the visible tokens picked by boolean indexing
    tokens = net.encoder.embed(img)
    ref = torch.cat([tokens[:, :1], tokens[:, 1:][~mask].view(3, num_visible, -1)], dim=1)
    for blk in net.encoder.blocks:
        ref = blk(ref)
    assert torch.allclose(latent, net.encoder.norm(ref), atol=1e-6)
    # masked pixels cannot reach the encoder, and its e_[M] is never used
    changed = img.clone()
    for j in mask[0].nonzero()[:, 0].tolist():
        patch_pixels(changed, j)[0] += 3.0
    assert torch.equal(net.encoder(changed, keep=keep), latent)
    assert not net.encoder.mask_token.requires_grad


def test_mae_decoder_hiddens():
    net, cfg = build("mae")
    img, mask = batch(cfg)
    first_input = []
    first_norm = net.decoder.decoder_blocks[0].norm1                   # sees block 0's input
    hook = first_norm.register_forward_pre_hook(lambda m, args: first_input.append(args[0]))
    pred, hiddens = net(img, mask, return_hiddens=True)
    hook.remove()
    assert len(hiddens) == cfg.decoder_depth + 1 and all(h.shape == (3, 17, 32) for h in hiddens)
    x0 = first_input[0]                                  # mask tokens + positions, all 1+N
    assert torch.allclose(hiddens[0], net.decoder.decoder_blocks[0].norm1(x0))
    pos = net.decoder.decoder_pos_embed[0, 1:]
    e_M = net.decoder.mask_token[0] + pos.expand(3, -1, -1)             # (3, N, D_dec)
    assert torch.allclose(x0[:, 1:][mask], e_M[mask])
    assert torch.allclose(net(img, mask)[0], pred, atol=1e-6)  # the fast path predicts the same
    assert pred.shape == (3, 16, 4 * 4 * 3)


def test_simmim_hiddens_keep_sdpa_and_match_the_fast_path(monkeypatch):
    net, cfg = build("simmim")
    img, mask = batch(cfg)
    sdpa, calls = F.scaled_dot_product_attention, []

    def counted_sdpa(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)
    monkeypatch.setattr(F, "scaled_dot_product_attention", counted_sdpa)
    pred, hiddens = net(img, mask, return_hiddens=True)
    assert len(calls) == len(net.encoder.blocks)                        # no explicit attention maps
    assert len(hiddens) == len(net.encoder.blocks) + 1 and hiddens[0].shape == (3, 17, 32)
    assert torch.allclose(net(img, mask)[0], pred, atol=1e-5)
    tokens, layers = net.encoder.forward_intermediates(img, mask)
    assert layers.attn is None and layers.attn_out is None
    assert all(torch.equal(a, b) for a, b in zip(layers.X, hiddens))


@pytest.mark.parametrize("framework", ["simmim", "mae"])
def test_every_parameter_gets_a_gradient(framework):
    net, cfg = build(framework, mto="true")
    img, mask = batch(cfg)
    pred, hiddens = net(img, mask, return_hiddens=True)
    loss = pretrain.reconstruction_loss(cfg, pred, img, mask)
    loss = loss + sum(losses.mto_losses([h[:, 1:] for h in hiddens], mask).values())
    loss.backward()
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == ({"encoder.mask_token"} if framework == "mae" else set())
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# -----------------------------------------------------------------------------
# The loop

class Spy:
    """Counts the calls that keep per-layer tokens (forward_intermediates of the ViT and of MAE's
    decoder), the blocks asked for explicit attention maps, and the calls of the MTO loss."""

    def __init__(self, monkeypatch):
        self.hiddens, self.maps, self.mto = 0, 0, 0
        for cls in (M.ViT, M.MAEDecoder):
            self.count(monkeypatch, cls, "forward_intermediates", "hiddens")
        self.count(monkeypatch, losses, "mto_losses", "mto")
        block = M.Block.forward_intermediates

        def block_spy(blk, x, shared_bias=None, attn=False):
            self.maps += attn
            return block(blk, x, shared_bias, attn)
        monkeypatch.setattr(M.Block, "forward_intermediates", block_spy)

    def count(self, monkeypatch, owner, name, counter):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("framework", ["simmim", "mae"])
def test_mto_off_collects_no_hidden_states(framework, monkeypatch, tiny_imagefolder, tmp_path):
    spy = Spy(monkeypatch)
    args = (TINY + (SIMMIM if framework == "simmim" else MAE)
            + [f"data_path={tiny_imagefolder}", "epochs=1"])
    pretrain.main(args + [f"out_dir={tmp_path / 'off'}"])
    assert (spy.hiddens, spy.maps, spy.mto) == (0, 0, 0)
    pretrain.main(args + [f"out_dir={tmp_path / 'on'}", "mto=true"])    # the spy sees them when on
    assert spy.hiddens == spy.mto == 4 and spy.maps == 0                # ... still with SDPA


def test_table3_ablation_weights_select_the_terms(tiny_imagefolder, tmp_path):
    """mto_spa=0 mto_r=0 mto_e=0.5: the loss is L_pixel + 0.5 L_e; the off terms are only logged."""
    pretrain.main(TINY + SIMMIM + [f"data_path={tiny_imagefolder}", f"out_dir={tmp_path}",
                                   "epochs=1", "mto=true", "mto_spa=0", "mto_r=0", "mto_e=0.5"])
    for r in log_of(tmp_path):
        assert r["loss"] == pytest.approx(r["pixel"] + 0.5 * r["e"], rel=1e-5)
        assert r["spa"] > 0 and r["r"] > 0


def test_bad_mim_config_one_line_errors():
    cases = [
        (["mto=true"], "mto=true needs framework=simmim or framework=mae"),
        (MAE + ["shared_rel_pos_bias=true"],
         "needs pos_embed learned or sincos and no relative position bias"),
        (SIMMIM + ["mask_patch_size=6"], "mask_patch_size (6) to be a multiple of patch_size (4)"),
        (SIMMIM + ["mto=true", "mto_e=-1"], "must be >= 0"),
        (SIMMIM + ["mto=true", "mto_spa=0", "mto_e=0", "mto_r=0"], "are all 0"),
        (MAE + ["decoder_heads=3"], "must be divisible by decoder_heads"),
        (["framework=beit"], "config key 'framework' must be one of"),
        (["lr_schedule=step"], "config key 'lr_schedule' must be one of"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError) as e:
            parse_config(pretrain.Config, TINY + args)
        assert message in str(e.value) and "\n" not in str(e.value)


def test_multistep_lr():
    lrs = [pretrain.multistep_lr(s, 10, 1.0, [70], 0.1) for s in (0, 5, 10, 69, 70, 100)]
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.1, 0.1])


def run(args, nproc=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "pretrain.py", *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_port=29541", "pretrain.py", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def log_of(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_simmim_and_mae_with_mto_end_to_end_and_the_analysis(tiny_imagefolder, tmp_path):
    """Both frameworks run as commands; MAE's checkpoint keeps its decoder; the tools read them."""
    runs = {}
    for name, extra in (("simmim", SIMMIM), ("mae", MAE)):
        out = str(tmp_path / name)
        run(TINY + extra + [f"data_path={tiny_imagefolder}", f"out_dir={out}", "mto=true",
                            "eval_knn_every=1"])
        log = log_of(out)
        steps = [r for r in log if "step" in r]
        assert len(steps) == 8 and all({"pixel", "spa", "e", "r"} <= set(r) for r in steps)
        assert all(math.isfinite(r["loss"]) for r in steps)
        assert [r["epoch"] for r in log if "knn_top1" in r] == [1, 2]
        runs[name] = out
    ckpt = torch.load(os.path.join(runs["mae"], "checkpoint.pth"), weights_only=False)
    decoder_keys = {"decoder.mask_token", "decoder.decoder_pos_embed",
                    "decoder.decoder_pred.weight"}
    assert decoder_keys <= set(ckpt["model"])
    encoder = M.load_encoder(os.path.join(runs["mae"], "encoder.pth"))   # the encoder alone, strict
    assert not any(k.startswith("decoder") for k in encoder.state_dict())

    from experiments import heterogeneity as tool
    out = str(tmp_path / "analysis")
    tool.main([f"checkpoints=[{runs['simmim']}/encoder.pth,{runs['mae']}/checkpoint.pth]",
               "labels=[SimMIM,MAE]", f"out_dir={out}", "num_images=8", "batch_size=4"])
    with open(os.path.join(out, "heterogeneity.csv")) as f:
        rows = [line.strip().split(",") for line in f]
    assert rows[0] == ["layer", "SimMIM", "SimMIM std", "MAE", "MAE std"]
    assert len(rows) == 1 + 3                                          # layers 0..2 (2 blocks each)
    values = [float(v) for r in rows[1:] for v in (r[1], r[3])]
    assert all(0 <= v <= math.log(16 - 12) + 1e-6 for v in values)    # |V| = 4 for both masks here
    assert os.path.getsize(os.path.join(out, "heterogeneity.png")) > 1000


def test_two_process_gloo_mae_mto_logs_same_losses_as_one(tiny_imagefolder, tmp_path):
    """DDP with MAE + MTO (visible-only encoder, a frozen e_[M], the decoder's hiddens) = 1
    process."""
    # fp32: in bf16 the two processes' gradient sums round differently, by more than rel=1e-4
    args = TINY + MAE + [f"data_path={tiny_imagefolder}", "mto=true", "epochs=1",
                         "precision=fp32"]
    run(args + [f"out_dir={tmp_path / 'one'}"])
    run(args + [f"out_dir={tmp_path / 'two'}"], nproc=2)
    a, b = log_of(tmp_path / "one"), log_of(tmp_path / "two")
    for key in ("loss", "pixel", "spa", "e", "r"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-5), key


def test_mae_resume_continues_with_the_decoder(tiny_imagefolder, tmp_path):
    """The full checkpoint carries MAE's decoder: a resumed run ends where an uninterrupted one
    does."""
    import shutil
    args = TINY + MAE + [f"data_path={tiny_imagefolder}", "mto=true"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(args + [f"out_dir={full}", "keep_every=1"])
    resumed.mkdir()
    shutil.copy(full / "checkpoint-0001.pth", resumed / "checkpoint.pth")
    assert "resumed from" in run(args + [f"out_dir={resumed}"]).stdout
    a = torch.load(full / "checkpoint.pth", weights_only=False)["model"]
    b = torch.load(resumed / "checkpoint.pth", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in log_of(resumed)] == [r["loss"] for r in log_of(full)][4:]


def old_mask_ids(mask):
    """mask_ids before num_masked: the counts read on the host, then a stable argsort."""
    count = mask.sum(1).tolist()[0]
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)
    return order[:, mask.shape[1] - count:], order[:, :mask.shape[1] - count]


def no_host_reads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a device -> host read")
    for name in ("tolist", "item", "__bool__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("num_masked", [0, 1, 9, 12, 16])
def test_mask_ids_with_a_known_count_are_the_old_ids_without_a_host_read(monkeypatch,
                                                                          num_masked):
    mask = exact_mask(5, 16, num_masked, seed=num_masked)
    ref = old_mask_ids(mask)
    for fn in (M.mask_ids, losses.mask_ids):
        assert all(torch.equal(a, b) for a, b in zip(fn(mask), ref))  # the count read on the host
        with monkeypatch.context() as m:
            no_host_reads(m)
            ids = fn(mask, num_masked)
        assert all(torch.equal(a, b) for a, b in zip(ids, ref))
        with pytest.raises(RuntimeError, match="num_masked"):  # a wrong count is still caught
            fn(mask, num_masked + 1)


def test_mae_and_mto_losses_with_a_known_count_are_bit_identical(monkeypatch):
    net, cfg = build("mae")
    img, mask = batch(cfg)
    k = data.num_masked_patches(mask.shape[1], cfg.mask_ratio)
    runs = []
    for num_masked in (None, k):  # None: the old path, counts read on the host
        net.zero_grad(set_to_none=True)
        with monkeypatch.context() as m:
            if num_masked is not None:
                no_host_reads(m)
            pred, hiddens = net(img, mask, return_hiddens=True, num_masked=num_masked)
            terms = losses.mto_losses([h[:, 1:] for h in hiddens], mask, num_masked=num_masked)
        (pred.square().mean() + sum(terms.values())).backward()
        runs.append((pred, hiddens, terms, [p.grad.clone() for p in net.parameters()
                                           if p.grad is not None]))
    (pred0, hid0, terms0, grads0), (pred1, hid1, terms1, grads1) = runs
    assert torch.equal(pred0, pred1)
    assert all(torch.equal(a, b) for a, b in zip(hid0, hid1))
    assert all(torch.equal(terms0[n], terms1[n]) for n in ("spa", "e", "r"))
    assert len(grads0) == len(grads1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))
