"""Unit tests for model.py: the ViT against timm, masking, per-layer tokens (forward_intermediates),
saving/loading, teachers.

All models are tiny (embed_dim 32, depth 2, 32x32 images), everything runs on the CPU and
offline.
"""
import json
import os
import socket
import time

import numpy as np
import pytest
import torch

import model as M
from model import (IMAGENET_MEAN, IMAGENET_STD, CLIPTeacher, DistillStudent, EMATeacher, ViTTeacher,
                   build_teacher, build_vit, encoder_state, load_encoder, relative_position_index,
                   resolve_clip_weights, sincos_pos_embed, to_timm)

IMG, PATCH = 32, 4
GRID = IMG // PATCH
N = GRID * GRID
D, DEPTH, HEADS = 32, 2, 2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def tiny(**overrides):
    return build_vit("vit_micro", img_size=IMG, patch_size=PATCH, **overrides)


def randomise(module, std=0.2):
    """Perturb every parameter (biases, gammas, LayerNorm affine, tables, tokens) so that no
    comparison passes only because something is zero or one."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


def images(b=2):
    return torch.randn(b, 3, IMG, IMG)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# -----------------------------------------------------------------------------
# 1 + 10. Equivalence with timm after to_timm

def test_learned_pos_layer_scale_matches_timm_vit():
    import timm.models.vision_transformer as tv
    ours = randomise(tiny(layer_scale=0.1)).eval()
    assert ours.blocks[0].attn.qkv.bias.abs().min() > 0  # the k part of the qkv bias is random too
    ref = tv.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH,
                               num_heads=HEADS, init_values=0.1, num_classes=0,
                               global_pool="").eval()
    sd = to_timm(ours.state_dict())
    assert "mask_token" not in sd
    ref.load_state_dict(sd, strict=True)
    x = images()
    with torch.no_grad():
        close(ours(x), ref.forward_features(x))


def test_sincos_pos_matches_timm_vit():
    import timm.models.vision_transformer as tv
    ours = randomise(tiny(pos_embed="sincos")).eval()
    assert "pos_embed" not in dict(ours.named_parameters())       # a fixed buffer ...
    assert "pos_embed" in ours.state_dict()                        # ... that is saved
    ref = tv.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH,
                               num_heads=HEADS, num_classes=0, global_pool="").eval()
    ref.load_state_dict(to_timm(ours.state_dict()), strict=True)  # buffer -> timm's pos_embed param
    close(ref.pos_embed.data, sincos_pos_embed(D, GRID).unsqueeze(0), atol=0)
    x = images()
    with torch.no_grad():
        close(ours(x), ref.forward_features(x))


@pytest.mark.parametrize("per_block,shared", [(True, True), (True, False), (False, True)])
def test_relative_position_bias_matches_timm_beit(per_block, shared):
    from timm.models.beit import Beit
    ours = randomise(tiny(pos_embed="none", rel_pos_bias=per_block, shared_rel_pos_bias=shared,
                          layer_scale=0.1)).eval()
    tables = [n for n, _ in ours.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == DEPTH * per_block + shared
    ref = Beit(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS,
               use_abs_pos_emb=False, use_rel_pos_bias=per_block, use_shared_rel_pos_bias=shared,
               init_values=0.1, num_classes=0, global_pool="").eval()
    ref.load_state_dict(to_timm(ours.state_dict()), strict=True)
    x = images()
    with torch.no_grad():
        close(ours(x), ref.forward_features(x))


def test_relative_position_index_matches_timm():
    from timm.models.beit import gen_relative_position_index
    assert torch.equal(relative_position_index(GRID), gen_relative_position_index((GRID, GRID)))
    idx = relative_position_index(3)
    assert idx.shape == (10, 10) and idx.max() == (2 * 3 - 1) ** 2 + 3 - 1
    assert idx[0, 0] == 27 and idx[0, 1] == 25 and idx[1, 0] == 26 and idx[1, 1] == idx[5, 5] == 12


def test_sincos_matches_mae_reference():
    """An independent transcription of MAE's get_2d_sincos_pos_embed (numpy, cls row of zeros)."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    dim, g = 16, 3
    grid = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))  # w first
    grid = np.stack(grid, axis=0).reshape(2, 1, g, g)
    emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    close(sincos_pos_embed(dim, g), torch.from_numpy(emb).float(), atol=1e-6)


def test_from_timm_round_trip():
    """timm VisionTransformer weights -> from_timm -> our ViT (plus its own mask token) -> same
    output."""
    import timm.models.vision_transformer as tv
    ref = randomise(tv.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH,
                                         num_heads=HEADS, init_values=0.1, num_classes=0,
                                         global_pool="")).eval()
    ours = tiny(layer_scale=0.1).eval()
    sd = M.from_timm({"model": ref.state_dict()})
    assert set(sd) == set(ours.state_dict()) - {"mask_token"}
    ours.load_state_dict({**sd, "mask_token": ours.mask_token.data}, strict=True)
    x = images()
    with torch.no_grad():
        close(ours(x), ref.forward_features(x))
    mae = {"model": {**ref.state_dict(), "decoder_embed.weight": torch.zeros(3, D),
                     "decoder_pos_embed": torch.zeros(1, 1 + N, 3),
                     "fc_norm.weight": torch.ones(D)}}
    assert set(M.from_timm(mae)) == set(ref.state_dict())


def test_to_timm_drops_mask_token_and_splits_qkv_bias_for_beit():
    ours = randomise(tiny(pos_embed="none", rel_pos_bias=True, layer_scale=0.1))
    sd = ours.state_dict()
    out = to_timm(sd)
    assert "mask_token" not in out
    assert not any(k.endswith("qkv.bias") or ".ls1." in k or ".ls2." in k for k in out)
    for i in range(DEPTH):
        q, k, v = sd[f"blocks.{i}.attn.qkv.bias"].chunk(3)
        assert torch.equal(out[f"blocks.{i}.attn.q_bias"], q)
        assert torch.equal(out[f"blocks.{i}.attn.v_bias"], v)
        assert torch.equal(out[f"blocks.{i}.gamma_1"], sd[f"blocks.{i}.ls1.gamma"])
        assert torch.equal(out[f"blocks.{i}.gamma_2"], sd[f"blocks.{i}.ls2.gamma"])
        assert torch.equal(out[f"blocks.{i}.attn.qkv.weight"], sd[f"blocks.{i}.attn.qkv.weight"])
    # without relative position bias only the mask token goes; the names are timm's already
    plain = tiny().state_dict()
    assert set(to_timm(plain)) == set(plain) - {"mask_token"}


def test_dropping_k_bias_is_exact():
    """softmax is invariant to the per-query constant q.b_k, so zeroing the k bias changes nothing
    (what to_timm relies on for Beit) - while zeroing the v bias does change the output."""
    ours = randomise(tiny(pos_embed="none", rel_pos_bias=True)).eval()
    x = images()
    with torch.no_grad():
        for blk in ours.blocks:
            blk.attn.qkv.bias[D:2 * D].normal_(0, 3.0)  # a large k bias
        before = ours(x)
        for blk in ours.blocks:
            blk.attn.qkv.bias[D:2 * D].zero_()
        close(ours(x), before)
        for blk in ours.blocks:
            blk.attn.qkv.bias[2 * D:].zero_()
        assert (ours(x) - before).abs().max() > 1e-3


# -----------------------------------------------------------------------------
# 2. forward_intermediates: the per-layer tokens X^l

INTERMEDIATE_CONFIGS = [dict(layer_scale=0.1),
                        dict(pos_embed="none", rel_pos_bias=True, shared_rel_pos_bias=True)]


@pytest.mark.parametrize("kwargs", INTERMEDIATE_CONFIGS)
def test_forward_intermediates_matches_the_fast_path(kwargs):
    """Without attn: the same SDPA path as forward, bit for bit, and the layers it documents."""
    ours = randomise(tiny(**kwargs)).eval()
    x = images(3)
    mask = torch.rand(3, N) < 0.5
    with torch.no_grad():
        tokens, layers = ours.forward_intermediates(x, mask)
        assert torch.equal(tokens, ours(x, mask))                    # (3, 1+N, D)
        assert len(layers.residual) == DEPTH and len(layers.X) == DEPTH + 1
        assert all(X_l.shape == (3, 1 + N, D) for X_l in layers.X)
        assert layers.attn is None and layers.attn_out is None
        assert torch.equal(layers.residual[0], ours.embed(x, mask))  # the stream entering block 0
        for l, blk in enumerate(ours.blocks):                        # X^l = norm1(residual^l)
            assert torch.equal(layers.X[l], blk.norm1(layers.residual[l]))
        assert layers.X[-1] is tokens                                # X^L: the final-normed output
        assert torch.equal(ours.norm(layers.pre_norm), tokens)


@pytest.mark.parametrize("kwargs", INTERMEDIATE_CONFIGS)
def test_bf16_on_cpu_is_the_explicit_attention_and_close_to_fp32(kwargs):
    """bf16 autocast on a CPU takes the explicit softmax(q k^T / sqrt(d) + bias) v, not the fused
    kernel (6x slower there): bit for bit the attention-maps path, within bf16 rounding of fp32."""
    ours = randomise(tiny(**kwargs)).eval()
    x, mask = images(3), torch.rand(3, N) < 0.5
    with torch.no_grad():
        fp32 = ours(x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = ours(x, mask)
            explicit, _ = ours.forward_intermediates(x, mask, attn=True)
    assert torch.equal(fast, explicit)
    assert (fast.float() - fp32).abs().max() < 0.1 * fp32.abs().max()


@pytest.mark.parametrize("kwargs", INTERMEDIATE_CONFIGS)
def test_forward_intermediates_attention_maps(kwargs):
    """attn=True: explicit softmax maps (rows sum to 1), the branches, the same tokens."""
    ours = randomise(tiny(**kwargs)).eval()
    x = images(3)
    mask = torch.rand(3, N) < 0.5
    with torch.no_grad():
        fast, plain = ours.forward_intermediates(x, mask)
        tokens, layers = ours.forward_intermediates(x, mask, attn=True)
    close(tokens, fast)
    for X_l, X_fast in zip(layers.X, plain.X):
        close(X_l, X_fast)
    assert len(layers.attn) == len(layers.attn_out) == DEPTH
    for maps, branch in zip(layers.attn, layers.attn_out):
        assert maps.shape == (3, HEADS, 1 + N, 1 + N) and (maps >= 0).all()
        close(maps.sum(-1), torch.ones(3, HEADS, 1 + N))
        assert branch.shape == (3, 1 + N, D)
    # the branch is what the attention adds: residual^0 + branch^0 + MLP(...) = residual^1
    blk, r0 = ours.blocks[0], layers.residual[0]
    after_attn = r0 + layers.attn_out[0]
    close(after_attn + blk.ls2(blk.mlp(blk.norm2(after_attn))), layers.residual[1])


def hand_loop(vit, x, k):
    """Block k's output before the final norm, by running the blocks by hand: (B, 1+N, D)."""
    tokens = vit.embed(x)
    shared_bias = vit.rel_pos_bias() if vit.rel_pos_bias is not None else None
    for blk in vit.blocks[: k + 1]:
        tokens = blk(tokens, shared_bias)
    return tokens


def test_forward_intermediates_depth_is_the_hand_loop():
    """depth=k+1 runs blocks 0..k only: pre_norm is block k's output (what the probes read,
    probe.frozen_tokens(vit, x, k)), tokens its final norm; bit for bit."""
    vit = randomise(build_vit("vit_micro", depth=3, img_size=IMG, patch_size=PATCH,
                              rel_pos_bias=True, shared_rel_pos_bias=True,
                              layer_scale=0.1)).eval()
    x = images()
    calls = []  # the blocks that ran, seen by their first LayerNorm
    hooks = [blk.norm1.register_forward_pre_hook(lambda m, args: calls.append(m))
             for blk in vit.blocks]
    with torch.no_grad():
        for k in range(3):
            expected = hand_loop(vit, x, k)
            calls.clear()
            tokens, layers = vit.forward_intermediates(x, depth=k + 1)
            assert calls == [blk.norm1 for blk in vit.blocks[: k + 1]]  # later ones never run
            assert torch.equal(layers.pre_norm, expected)
            assert torch.equal(tokens, vit.norm(expected))
            assert len(layers.X) == k + 2 and len(layers.residual) == k + 1
            if k > 0:
                assert torch.equal(layers.residual[k], hand_loop(vit, x, k - 1))
            # collect=False (the probes): the same outputs, no per-layer tensors held
            tokens2, bare = vit.forward_intermediates(x, depth=k + 1, collect=False)
            assert torch.equal(bare.pre_norm, expected) and torch.equal(tokens2, tokens)
            assert bare.X == [] and bare.residual == []
        assert torch.equal(vit.forward_intermediates(x, depth=3)[1].pre_norm,
                           vit.forward_intermediates(x)[1].pre_norm)
        _, layers = vit.forward_intermediates(x, depth=0)            # no block: the embedding
        assert torch.equal(layers.pre_norm, vit.embed(x)) and len(layers.X) == 1
    for h in hooks:
        h.remove()


def test_forward_intermediates_with_keep():
    """MAE's encoder path: [cls] + the visible patches only, T = 1 + |V|."""
    ours = randomise(tiny(layer_scale=0.1)).eval()
    x = images()
    keep = torch.stack([torch.randperm(N)[:20].sort().values for _ in range(2)])  # (2, |V|)
    with torch.no_grad():
        tokens, layers = ours.forward_intermediates(x, keep=keep)
        assert torch.equal(tokens, ours(x, keep=keep))
    assert tokens.shape == (2, 21, D) and layers.X[0].shape == (2, 21, D)


# -----------------------------------------------------------------------------
# 3. gradients

@pytest.mark.parametrize("kwargs", [
    dict(layer_scale=0.1, rel_pos_bias=True, shared_rel_pos_bias=True, drop_path=0.1),
    dict(pos_embed="sincos", num_classes=5)])
def test_every_parameter_gets_a_gradient(kwargs):
    ours = tiny(**kwargs).train()
    x = images(4)
    mask = torch.zeros(4, N, dtype=torch.bool)
    mask[:, ::3] = True
    out = ours(x, mask)
    (out * torch.randn_like(out)).sum().backward()  # random projection: not LayerNorm-invariant
    names = [n for n, _ in ours.named_parameters()]
    assert "mask_token" in names
    if kwargs.get("num_classes"):
        assert "head.weight" in names
    for n, p in ours.named_parameters():
        assert p.grad is not None, f"{n} got no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{n} has an all-zero gradient"


def test_distill_student_shapes_and_gradients():
    enc = tiny()
    student = DistillStudent(enc, target_dim=7)
    mask = torch.rand(2, N) < 0.4
    u = student(images(), mask)
    assert u.shape == (2, N, 7)
    u.sum().backward()
    assert enc.mask_token.grad is not None and student.head.weight.grad is not None


# -----------------------------------------------------------------------------
# 4. masked patches use e_[M]

def patch_slice(j):
    r, c = divmod(j, GRID)
    rows, cols = slice(r * PATCH, (r + 1) * PATCH), slice(c * PATCH, (c + 1) * PATCH)
    return (slice(None), slice(None), rows, cols)


def test_masked_patch_uses_mask_token():
    ours = randomise(tiny(layer_scale=0.1)).eval()
    j = 10
    x = images()
    y = x.clone()
    y[patch_slice(j)] = torch.randn(2, 3, PATCH, PATCH) * 5
    assert not torch.equal(x, y)
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[:, j] = True
    mask[0, 3] = True
    with torch.no_grad():
        # masked: the patch's pixels are never seen
        torch.testing.assert_close(ours(y, mask), ours(x, mask), atol=0, rtol=0)
        emb = ours.embed(x, mask)
        expected = ours.mask_token[0, 0] + ours.pos_embed[0, 1 + j]
        torch.testing.assert_close(emb[0, 1 + j], expected, atol=0, rtol=0)
        torch.testing.assert_close(emb[1, 1 + j], expected, atol=0, rtol=0)
        # unmasked: they are
        assert (ours(y) - ours(x)).abs().max() > 1e-3
        none = torch.zeros_like(mask)
        assert (ours(y, none) - ours(x, none)).abs().max() > 1e-3
        # an all-False mask is the same as no mask
        close(ours(x, torch.zeros_like(mask)), ours(x), atol=0)
        # the mask token itself matters (a random change: adding a constant to every channel
        # would be removed by the LayerNorms, as every read of the residual stream is normed)
        before = ours(x, mask)
        ours.mask_token.add_(torch.randn_like(ours.mask_token))
        assert (ours(x, mask) - before).abs().max() > 1e-3
        # ... but not when nothing is masked
        close(ours(x), ours(x, torch.zeros_like(mask)), atol=0)


# -----------------------------------------------------------------------------
# 5. saving and loading encoders

@pytest.mark.parametrize("kwargs", [dict(layer_scale=0.1),
                                    dict(pos_embed="sincos", rel_pos_bias=True,
                                         shared_rel_pos_bias=True)])
def test_encoder_state_round_trip(tmp_path, kwargs):
    ours = randomise(tiny(**kwargs)).eval()
    path = tmp_path / "encoder.pth"
    torch.save(encoder_state(ours), path)
    loaded = load_encoder(str(path)).eval()
    assert loaded.cfg == ours.cfg
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    x = images()
    mask = torch.rand(2, N) < 0.5
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, mask), ours(x, mask), atol=0, rtol=0)


def test_load_encoder_drops_classifier_head(tmp_path):
    clf = randomise(tiny(num_classes=5)).eval()
    path = tmp_path / "clf.pth"
    torch.save(encoder_state(clf), path)
    assert load_encoder(str(path)).head is not None
    enc = load_encoder(str(path), num_classes=0).eval()
    assert enc.head is None
    x = images()
    with torch.no_grad():
        tokens = clf.norm(clf.blocks[1](clf.blocks[0](clf.embed(x))))
        close(enc(x), tokens, atol=0)


def test_load_encoder_errors(tmp_path):
    missing = str(tmp_path / "nope" / "encoder.pth")
    with pytest.raises(FileNotFoundError) as e:
        load_encoder(missing)
    assert all(word in str(e.value) for word in (missing, "encoder.pth", "pretrain.py"))
    bogus = tmp_path / "weights.pth"
    torch.save(tiny().state_dict(), bogus)
    with pytest.raises(ValueError, match="'config' and 'model'"):
        load_encoder(str(bogus))


def test_checkpoint_teacher(tmp_path):
    enc = randomise(tiny()).eval()
    path = tmp_path / "encoder.pth"
    torch.save(encoder_state(enc), path)
    teacher = build_teacher("checkpoint", pretrained=str(path))
    assert isinstance(teacher, ViTTeacher)
    assert teacher.out_dim == D and teacher.num_patches == N
    x = images()
    t = teacher(x)
    assert t.shape == (2, N, D) and t.dtype == torch.float32 and not t.requires_grad
    with torch.no_grad():
        close(t, enc(x)[:, 1:], atol=0)
    with pytest.raises(ValueError, match="clip"):
        build_teacher("dino")


def test_checkpoint_teacher_from_a_classifier_drops_the_head(tmp_path):
    """finetune.py's best.pth holds a ViT with a head; as a teacher it must give patch tokens."""
    clf = randomise(tiny(num_classes=4)).eval()
    path = tmp_path / "best.pth"
    torch.save(encoder_state(clf), path)
    x = images()
    t = build_teacher("checkpoint", pretrained=str(path))(x)
    assert t.shape == (2, N, D)
    with torch.no_grad():
        tokens, _ = clf.forward_intermediates(x)
    close(t, tokens[:, 1:])  # the classifier's final-normed patch tokens


# -----------------------------------------------------------------------------
# 6. ViT errors

def test_vit_rejects_a_bad_pos_embed_and_img_size():
    with pytest.raises(ValueError, match="pos_embed 'rope'"):
        tiny(pos_embed="rope")
    with pytest.raises(ValueError, match="patch_size 4 does not divide img_size 30"):
        build_vit("vit_micro", img_size=30, patch_size=4)


def test_build_vit_sizes():
    vit = tiny()
    assert vit.cfg.embed_dim == D and len(vit.blocks) == DEPTH
    assert vit.blocks[0].attn.num_heads == HEADS
    assert vit.num_patches == N
    assert vit(images()).shape == (2, 1 + N, D)
    assert tiny(num_classes=4)(images()).shape == (2, 4)


# -----------------------------------------------------------------------------
# 7. CLIP teacher through open_clip's own loading path

CLIP_NAME = "dtm-test-tiny-clip"
CLIP_CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": IMG, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised (and then perturbed) tiny open_clip model registered under
    CLIP_NAME, and a file holding its state dict."""
    import open_clip
    folder = tmp_path_factory.mktemp("clip")
    cfg_file = folder / f"{CLIP_NAME}.json"
    cfg_file.write_text(json.dumps(CLIP_CFG))
    open_clip.add_model_config(str(cfg_file))
    assert CLIP_NAME in open_clip.list_models()
    torch.manual_seed(1)
    clip = open_clip.create_model(CLIP_NAME).eval()
    randomise(clip, std=0.1)
    weights = folder / "tiny_clip.pt"
    torch.save(clip.state_dict(), weights)
    return clip, str(weights)


def test_clip_teacher_matches_open_clip_visual_tokens(tiny_clip):
    import open_clip
    clip, weights = tiny_clip
    teacher = CLIPTeacher(CLIP_NAME, pretrained=weights)
    assert teacher.out_dim == CLIP_CFG["embed_dim"]
    assert teacher.num_patches == (IMG // 8) ** 2
    pixels = torch.rand(2, 3, IMG, IMG)  # in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x_student = (pixels - mean) / std
    c_mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    c_std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    x_clip = (pixels - c_mean) / c_std
    out = teacher(x_student)
    assert out.shape == (2, (IMG // 8) ** 2, CLIP_CFG["embed_dim"]) and out.dtype == torch.float32
    assert not out.requires_grad
    visual = clip.visual
    visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = visual(x_clip)  # open_clip's tokens are after ln_post (see _pool)
            expected = tokens @ visual.proj
    finally:
        visual.output_tokens = False
    assert expected.shape == out.shape
    close(out, expected, atol=1e-5)
    # the weights really came from the file: a fresh random model disagrees
    torch.manual_seed(2)
    other = open_clip.create_model(CLIP_NAME).eval()
    other.visual.output_tokens = True
    with torch.no_grad():
        _, other_tokens = other.visual(x_clip)
    assert (other_tokens @ other.visual.proj - out).abs().max() > 1e-3


def test_clip_teacher_is_frozen_and_stays_in_eval(tiny_clip):
    _, weights = tiny_clip
    teacher = build_teacher("clip", clip_model=CLIP_NAME, pretrained=weights)
    assert isinstance(teacher, CLIPTeacher)
    params = list(teacher.parameters())
    assert params and not any(p.requires_grad for p in params)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    wrapper = torch.nn.ModuleDict({"teacher": teacher, "student": tiny()})
    wrapper.train()
    assert not any(m.training for m in teacher.modules())
    assert wrapper["student"].training


# -----------------------------------------------------------------------------
# 8. resolve_clip_weights fails fast and clearly

@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network at all, and an empty Hugging Face cache."""
    import huggingface_hub.constants as hfc
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    probed = []

    def unreachable(host, timeout=3.0):
        probed.append(host)
        return False

    def no_socket(*args, **kwargs):
        raise AssertionError(f"test tried to open a connection: {args}")

    monkeypatch.setattr(M, "_reachable", unreachable)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    return cache, probed


def test_resolve_clip_weights_fails_fast_without_network(offline):
    _, probed = offline
    start = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        resolve_clip_weights("ViT-B-16-quickgelu", "openai")
    assert time.monotonic() - start < 15
    msg = str(e.value)
    assert "teacher_pretrained" in msg and "ViT-B-16-quickgelu" in msg and "openai" in msg
    assert "huggingface.co" in probed
    # the same through the teacher's constructor
    with pytest.raises(RuntimeError, match="teacher_pretrained"):
        CLIPTeacher("ViT-B-16-quickgelu", "openai")


def test_resolve_clip_weights_uses_the_hf_cache(offline):
    """A tag whose weights are in the Hugging Face cache resolves to the cached file, offline.
    open_clip's hf_hub entry for ViT-B-16-quickgelu/openai is
    'timm/vit_base_patch16_clip_224.openai/' (repo id + '/' + empty filename -> open_clip's
    default weight file names)."""
    cache, probed = offline
    import open_clip
    hub = open_clip.get_pretrained_cfg("ViT-B-16-quickgelu", "openai")["hf_hub"]
    repo = hub[:-1] if hub.endswith("/") else hub
    assert repo == "timm/vit_base_patch16_clip_224.openai"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    cached = snap / "open_clip_model.safetensors"
    cached.write_bytes(b"not really weights")
    from huggingface_hub import try_to_load_from_cache
    # the fake cache works
    assert try_to_load_from_cache(repo, "open_clip_model.safetensors") == str(cached)
    assert resolve_clip_weights("ViT-B-16-quickgelu", "openai") == str(cached)
    assert probed == []


def test_resolve_clip_weights_local_files_and_unknown_tags(offline, tmp_path):
    existing = tmp_path / "weights.bin"
    existing.write_bytes(b"x")
    assert resolve_clip_weights("ViT-B-16-quickgelu", str(existing)) == str(existing)
    missing_files = (str(tmp_path / "nope.pt"), "nope.safetensors",
                     os.path.join("some", "dir", "w"))
    for missing in missing_files:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            resolve_clip_weights("ViT-B-16-quickgelu", missing)
    with pytest.raises(ValueError) as e:
        resolve_clip_weights("ViT-B-16-quickgelu", "laion9000")
    msg = str(e.value)
    assert all(word in msg for word in ("laion9000", "'openai'", "dfn2b", "teacher_pretrained"))


# -----------------------------------------------------------------------------
# 9. EMA teacher

def test_ema_teacher_update():
    student = randomise(tiny(layer_scale=0.1))
    teacher = EMATeacher(student)
    assert teacher.encoder is not student
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    old = {n: p.clone() for n, p in teacher.encoder.named_parameters()}
    randomise(student, std=0.5)  # the student moves on; the copy must not follow by itself
    for n, p in teacher.encoder.named_parameters():
        assert torch.equal(p, old[n]), n

    teacher.update(student, momentum=1.0)
    for n, p in teacher.encoder.named_parameters():
        assert torch.equal(p, old[n]), n

    teacher.update(student, momentum=0.5)
    s = dict(student.named_parameters())
    for n, p in teacher.encoder.named_parameters():
        close(p, 0.5 * old[n] + 0.5 * s[n], atol=1e-6)
    w_t, w_s = teacher.encoder.blocks[1].mlp.fc2.weight, student.blocks[1].mlp.fc2.weight
    close(w_t[0, :3], (old["blocks.1.mlp.fc2.weight"][0, :3] + w_s[0, :3]) / 2, atol=1e-6)

    mid = {n: p.clone() for n, p in teacher.encoder.named_parameters()}
    teacher.update(student, momentum=0.9)
    for n, p in teacher.encoder.named_parameters():
        close(p, 0.9 * mid[n] + 0.1 * s[n], atol=1e-6)

    teacher.update(student, momentum=0.0)
    for n, p in teacher.encoder.named_parameters():
        assert torch.equal(p, s[n]), n
    assert not any(p.requires_grad for p in teacher.parameters())
    x = images()
    with torch.no_grad():
        close(teacher(x), student.eval()(x)[:, 1:], atol=0)
    teacher.train()
    assert not teacher.encoder.training


def test_fix_init_rescales_output_projections_by_depth():
    """BEiT's fix_init_weight: block i's attn.proj and mlp.fc2 weights / sqrt(2 (i + 1))."""
    import math
    from model import build_vit
    torch.manual_seed(0)
    plain = build_vit("vit_micro", img_size=16, patch_size=4)
    torch.manual_seed(0)
    fixed = build_vit("vit_micro", img_size=16, patch_size=4, fix_init=True)
    for i, (a, b) in enumerate(zip(plain.blocks, fixed.blocks)):
        s = math.sqrt(2.0 * (i + 1))
        assert torch.allclose(b.attn.proj.weight, a.attn.proj.weight / s)
        assert torch.allclose(b.mlp.fc2.weight, a.mlp.fc2.weight / s)
        assert torch.equal(b.attn.qkv.weight, a.attn.qkv.weight)


def test_global_pool_avg_matches_timm():
    """global_pool='avg': LayerNorm(mean of the patch tokens) -> head, timm's VisionTransformer
    with global_pool='avg' (norm = Identity, fc_norm); the weights move by name."""
    import timm
    from model import build_vit, to_timm
    torch.manual_seed(0)
    vit = build_vit("vit_micro", img_size=16, patch_size=4, num_classes=5, global_pool="avg").eval()
    assert isinstance(vit.norm, torch.nn.Identity) and vit.fc_norm is not None
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
        global_pool="avg", class_token=True).eval()
    ref.load_state_dict(to_timm(vit.state_dict()), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(vit(x), ref(x), atol=1e-5)


def test_ema_teacher_update_is_the_per_parameter_lerp_bit_for_bit():
    """EMATeacher.update (one multi-tensor lerp) = the old loop of lerp_ per parameter, exactly."""
    student = randomise(tiny(layer_scale=0.1))
    teacher = EMATeacher(student)
    randomise(teacher.encoder, std=0.3)
    randomise(student, std=0.5)
    reference = [p.clone() for p in teacher.encoder.parameters()]
    for momentum in (0.996, 0.9, 0.5, 0.123):
        teacher.update(student, momentum)
        for p_t, p_s in zip(reference, student.parameters()):  # the old update, written plainly
            p_t.lerp_(p_s.detach(), 1.0 - momentum)
        for (n, p), ref in zip(teacher.encoder.named_parameters(), reference):
            assert torch.equal(p, ref), (momentum, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relative_position_bias_reaches_attention_aligned_and_unchanged(dtype, monkeypatch):
    # the bias SDPA receives: rows of 1 + N = 17 tokens start every 24 elements (a multiple of
    # 8: 16 bytes in bf16), last dim contiguous; the model's outputs and gradients are those of
    # the plain `bias.unsqueeze(0).to(dtype)` bit for bit
    table = torch.randn(3, 17, 17)
    b = M.sdpa_bias(table, dtype)
    assert b.shape == (1, 3, 17, 17) and b.dtype == dtype
    assert b.stride() == (3 * 17 * 24, 17 * 24, 24, 1)
    assert torch.equal(b, table.unsqueeze(0).to(dtype))
    results = []
    for plain in (False, True):
        if plain:
            monkeypatch.setattr(M, "sdpa_bias", lambda bias, dt: bias.unsqueeze(0).to(dt))
        torch.manual_seed(0)
        vit = randomise(tiny(pos_embed="none", rel_pos_bias=True, shared_rel_pos_bias=True))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = vit(images())
        out.float().square().sum().backward()
        results.append([out.detach()] + [p.grad for p in vit.parameters() if p.grad is not None])
    assert len(results[0]) == len(results[1]) > 10
    assert all(torch.equal(x, y) for x, y in zip(*results))
