"""Fine-tuning: layer-wise decay, Mixup/CutMix targets, shared rel-pos expansion, timm export."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F

import finetune
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_layer_decay_scales():
    vit = M.build_vit("vit_micro", img_size=16, patch_size=4, num_classes=3, rel_pos_bias=True,
                      shared_rel_pos_bias=True)
    depth, decay = vit.cfg.depth, 0.6
    groups = finetune.layer_decay_groups(vit, 0.05, decay)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    expected_layer = {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0,
                      "rel_pos_bias.relative_position_bias_table": 0,
                      "blocks.0.attn.qkv.weight": 1, "blocks.1.mlp.fc2.bias": 2,
                      "blocks.1.attn.relative_position_bias_table": 2, "norm.weight": depth + 1,
                      "head.weight": depth + 1}
    params = dict(vit.named_parameters())
    for name, lid in expected_layer.items():
        assert scale_of[id(params[name])] == pytest.approx(decay ** (depth + 1 - lid)), name
    assert len(scale_of) == len(params)  # every parameter is in exactly one group
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert wd[id(params["blocks.0.attn.qkv.weight"])] == 0.05
    assert wd[id(params["blocks.0.attn.qkv.bias"])] == 0.0 and wd[id(params["cls_token"])] == 0.0


def test_mixup_cutmix_targets_and_soft_cross_entropy():
    torch.manual_seed(0)
    cfg = finetune.Config(label_smoothing=0.1)
    mix = finetune.mix_batch(cfg, num_classes=5)
    img, labels = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    for _ in range(10):  # both Mixup and CutMix get drawn
        out, target = mix(img, labels)
        assert out.shape == img.shape and target.shape == (16, 5)
        assert torch.allclose(target.sum(-1), torch.ones(16), atol=1e-6)
        assert (target >= 0.1 / 5 - 1e-6).all()  # smoothing puts eps/K on every class
    logits = torch.randn(16, 5)
    expected = F.cross_entropy(logits, target).item()
    assert finetune.soft_cross_entropy(logits, target) == pytest.approx(expected, rel=1e-5)
    # with no mixing and no smoothing it is ordinary cross entropy
    plain = finetune.mix_batch(finetune.Config(mixup=0, cutmix=0, label_smoothing=0), 5)
    _, t = plain(img, labels)
    expected = F.cross_entropy(logits, labels).item()
    assert finetune.soft_cross_entropy(logits, t) == pytest.approx(expected, rel=1e-5)


def _randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("bias", "gamma")):
                p.normal_(0, 0.5)


def test_shared_rel_pos_checkpoint_loads_into_per_block_model(tmp_path):
    torch.manual_seed(0)
    enc = M.build_vit("vit_micro", img_size=16, patch_size=4, pos_embed="none", rel_pos_bias=True,
                      shared_rel_pos_bias=True, layer_scale=0.1).eval()
    _randomise(enc)
    path = tmp_path / "encoder.pth"
    torch.save(M.encoder_state(enc), path)
    cfg = finetune.Config(init=str(path), drop_path=0.0)
    clf = finetune.build_model(cfg, num_classes=4).eval()
    assert clf.rel_pos_bias is None and clf.cfg.rel_pos_bias and not clf.cfg.shared_rel_pos_bias
    clf.head = None  # compare the features
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(enc(x), clf(x), atol=1e-5)


@pytest.mark.parametrize("rel", [False, True])
def test_export_to_timm_gives_same_logits(rel):
    torch.manual_seed(0)
    kw = dict(pos_embed="none", rel_pos_bias=True) if rel else {}
    vit = M.build_vit("vit_micro", img_size=16, patch_size=4, num_classes=3, layer_scale=0.1,
                      **kw).eval()
    _randomise(vit)
    with torch.no_grad():
        vit.head.weight.normal_()
    exported = finetune.export_timm(vit)
    cls = getattr(timm.models, "beit" if rel else "vision_transformer")
    t = getattr(cls, exported["arch"])(**exported["args"]).eval()
    t.load_state_dict(exported["model"], strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.allclose(vit(x), t(x), atol=1e-5)


def test_a_few_steps_drive_the_loss_down(tiny_imagefolder, tmp_path):
    out = tmp_path / "ft"
    args = ["dataset=imagefolder", f"data_path={tiny_imagefolder}", "model=vit_micro",
            "img_size=16", "patch_size=4", "init=", "epochs=6", "warmup_epochs=1", "batch_size=8",
            "blr=0.05", "mixup=0", "cutmix=0", "randaug_ops=0", "reprob=0", "label_smoothing=0",
            "drop_path=0", "crop_scale_min=1.0", "num_workers=0", "log_every=4",
            "layer_decay=1.0", f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "finetune.py", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    evals = [r for r in records if "val_top1" in r]
    assert len(evals) == 6 and evals[-1]["val_count"] == 8
    assert os.path.isfile(out / "best.pth") and os.path.isfile(out / "model_timm.pth")


def test_two_process_gloo_fine_tuning_runs_to_the_end(tiny_imagefolder, tmp_path):
    """DDP needs a gradient for every trainable parameter: the classifier's unused mask token must
    not be one (it stopped the run at step 2 with "parameters that were not used")."""
    out = tmp_path / "ft2"
    args = ["dataset=imagefolder", f"data_path={tiny_imagefolder}", "model=vit_micro",
            "img_size=16", "patch_size=4", "init=", "epochs=2", "warmup_epochs=1", "batch_size=8",
            "blr=1e-3", "num_workers=0", "log_every=1", "drop_path=0.1", f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_port=29557"]
    p = subprocess.run([*torchrun, "finetune.py", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["val_count"] for r in records if "val_count" in r] == [8, 8]
    exported = torch.load(out / "model_timm.pth", weights_only=True)
    assert "mask_token" not in exported["model"] and exported["step"] == 8


def test_the_classifier_trains_every_parameter_but_the_mask_token():
    cfg = finetune.Config(model="vit_micro", img_size=16, patch_size=4)
    clf = finetune.build_model(cfg, num_classes=3)
    frozen = [name for name, p in clf.named_parameters() if not p.requires_grad]
    assert frozen == ["mask_token"] and "mask_token" in clf.state_dict()


# -----------------------------------------------------------------------------
# The learning-rate convention, mean pooling, RandAugment's scale, random erasing

def test_peak_lr_is_lr_as_given_or_blr_scaled_by_the_batch():
    lr, note = finetune.peak_lr(finetune.Config(lr=5e-4, blr=1.0, batch_size=1024))
    assert lr == 5e-4 and note == "peak lr 0.0005 (lr, as given: BEiT v2 convention)"
    lr, note = finetune.peak_lr(finetune.Config(blr=1e-3, batch_size=8))
    assert lr == pytest.approx(3.125e-5)
    assert note == "peak lr 3.13e-05 (blr 0.001 x batch 8 / 256: MAE convention)"


def _encoder_file(tmp_path):
    torch.manual_seed(0)
    enc = M.build_vit("vit_micro", img_size=16, patch_size=4, layer_scale=0.1)
    with torch.no_grad():
        enc.norm.weight.normal_()
        enc.norm.bias.normal_()
    path = tmp_path / "encoder.pth"
    torch.save(M.encoder_state(enc), path)
    return enc, path


def test_avg_pool_drops_the_final_norm_and_starts_fc_norm_fresh(tmp_path):
    enc, path = _encoder_file(tmp_path)
    clf = finetune.build_model(finetune.Config(init=str(path), global_pool="avg"), num_classes=3)
    assert isinstance(clf.norm, torch.nn.Identity) and "norm.weight" not in clf.state_dict()
    assert torch.equal(clf.fc_norm.weight, torch.ones(32))  # not the encoder's (random) norm
    assert torch.equal(clf.fc_norm.bias, torch.zeros(32))
    assert torch.equal(clf.blocks[1].mlp.fc2.weight, enc.blocks[1].mlp.fc2.weight)
    x = torch.randn(2, 3, 16, 16)
    clf.eval()
    tokens = enc.blocks[1](enc.blocks[0](enc.embed(x)))           # (2, 1+16, 32), no final norm
    want = clf.head(clf.fc_norm(tokens[:, 1:].mean(1)))
    torch.testing.assert_close(clf(x), want)


def test_avg_pool_run_logs_the_given_lr_and_matches_timm(tiny_imagefolder, tmp_path):
    """A tiny run from an encoder with global_pool=avg and lr given (BEiT v2): the log holds the
    peak lr at the end of warm-up, and model_timm.pth is timm's ViT with global_pool='avg'."""
    _, path = _encoder_file(tmp_path)
    out = tmp_path / "ft_avg"
    args = ["dataset=imagefolder", f"data_path={tiny_imagefolder}", f"init={path}", "img_size=16",
            "global_pool=avg", "lr=5e-4", "blr=1.0", "epochs=2", "warmup_epochs=1", "batch_size=8",
            "num_workers=0", "log_every=1", "randaug_ops=1", f"out_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "finetune.py", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "peak lr 0.0005 (lr, as given: BEiT v2 convention)" in p.stdout
    assert "not used: ['norm.weight', 'norm.bias']" in p.stdout
    assert "'fc_norm.weight', 'fc_norm.bias'" in p.stdout
    lrs = {r["step"]: r["lr"] for r in map(json.loads, open(out / "log.jsonl")) if "lr" in r}
    assert lrs[5] == pytest.approx(5e-4) and max(lrs.values()) == pytest.approx(5e-4)
    exported = torch.load(out / "model_timm.pth", weights_only=True)
    assert exported["arch"] == "VisionTransformer" and exported["args"]["global_pool"] == "avg"
    ref = timm.models.vision_transformer.VisionTransformer(**exported["args"]).eval()
    ref.load_state_dict(exported["model"], strict=True)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    ours = M.ViT(M.ViTConfig(**ckpt["vit_config"])).eval()
    ours.load_state_dict(ckpt["model"], strict=True)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), atol=1e-5, rtol=1e-4)


def test_rand_augment_magnitude_is_on_timms_0_to_10_scale():
    """rand-m9 in timm is 90% of each operation's range; torchvision with 11 bins gives the same
    for every shared operation but posterize (DECISIONS.md, section 5)."""
    from timm.data import auto_augment as AA
    cfg = finetune.Config(randaug_magnitude=9, randaug_ops=2)
    ops = finetune.rand_augment(cfg).transforms                      # timm: each op with p = 0.5
    assert [(t.p, t.transforms[0].num_ops) for t in ops] == [(0.5, 1), (0.5, 1)]
    ra = ops[0].transforms[0]
    space = lambda op: ra._AUGMENTATION_SPACE[op][0](ra.num_magnitude_bins, 224, 224)  # noqa
    ours = lambda op: float(space(op)[ra.magnitude])  # noqa: E731
    arg = lambda op: AA.LEVEL_TO_ARG[op](9, {"translate_pct": 0.45})[0]  # noqa: E731
    theirs = lambda op: abs(arg(op))  # noqa: E731  (timm negates at random)
    assert ours("Rotate") == pytest.approx(theirs("Rotate")) == pytest.approx(27.0)
    assert ours("ShearX") == pytest.approx(theirs("ShearX")) == pytest.approx(0.27)
    for op in ("Brightness", "Color", "Contrast", "Sharpness"):  # timm inc1: 1 +- 0.81
        assert ours(op) == pytest.approx(abs(arg(op + "Increasing") - 1.0), abs=1e-6)
    assert ours("TranslateX") / 224 == pytest.approx(theirs("TranslateXRel"), rel=0.01)
    assert ours("Solarize") * 256 == pytest.approx(theirs("SolarizeIncreasing"), abs=1.0)
    assert int(space("Posterize")[ra.magnitude]) == 4                 # timm inc1 keeps 1 bit
    assert AA.LEVEL_TO_ARG["PosterizeIncreasing"](9, {})[0] == 1
    # torchvision's default 31 bins would put magnitude 9 at 30% of the range
    assert float(ra._AUGMENTATION_SPACE["Rotate"][0](31, 224, 224)[9]) == pytest.approx(9.0)
    assert ra.fill == [124, 116, 104]                               # timm's mean-grey fill


def test_random_erasing_writes_per_pixel_normal_values():
    """timm's mode 'pixel': the erased box holds independent N(0, 1) values (after normalisation),
    not a constant. A mean-grey image normalises to ~0, so what differs from 0 is the box."""
    from PIL import Image
    cfg = finetune.Config(img_size=64, reprob=1.0, randaug_ops=0, crop_scale_min=1.0)
    tf = finetune.train_transform(cfg)
    grey = Image.new("RGB", (64, 64), (124, 116, 104))
    torch.manual_seed(0)
    images = torch.stack([tf(grey) for _ in range(20)])             # (20, 3, 64, 64)
    erased = images[images.abs() > 0.05]
    assert erased.numel() > 2000
    assert erased.mean().abs() < 0.1 and 0.9 < erased.std() < 1.1
    assert erased.unique().numel() > 0.9 * erased.numel()            # no constant fill
