"""probe.main's loop on common.Run: the per-step lr list is the old per-step cosine_lr, and a
training step draws nothing from torch's global RNG, so Run.steps' per-step seed (step_seed)
changes no number the probe computes."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import losses  # noqa: E402
import model as M  # noqa: E402
import probe  # noqa: E402
from common import cosine_lr, cosine_schedule, parse_config  # noqa: E402


def test_cosine_schedule_is_cosine_lr_at_every_step():
    cfg = parse_config(probe.Config, ["epochs=5", "warmup_epochs=2", "min_lr=1e-4"])
    lr_at = cosine_schedule(cfg, 0.4, steps_per_epoch=7)  # what probe.main uses
    assert len(lr_at) == 35
    assert lr_at == [cosine_lr(s, 35, 14, 0.4, 1e-4) for s in range(35)]


def one_step(cfg, vit, sources, images, labels, seed):
    """Backbone features (eval mode, drop path set but off) -> every head -> one LARS step, after
    seeding the global RNG with `seed`. -> the heads' state."""
    torch.manual_seed(cfg.seed)
    heads = probe.build_heads(cfg, vit, 3, sources).train()
    optimizer = probe.LARS([p for p in heads.parameters() if p.requires_grad], lr=1.0)
    torch.manual_seed(seed)  # what Run.steps does before each step
    feats = probe.features(sources, images, cfg)
    loss, _ = losses.probe_loss(heads(feats), labels)
    loss.backward()
    optimizer.step()
    return heads.state_dict()


def test_a_training_step_does_not_depend_on_the_global_seed():
    cfg = parse_config(probe.Config, ["heads=[cls, cls_norm, mean, abmilp]", "baselines=true"])
    torch.manual_seed(0)
    vit = M.build_vit("vit_micro", depth=2, img_size=16, patch_size=4, drop_path=0.5)
    vit = vit.eval().requires_grad_(False)
    sources = probe.feature_sources(cfg, vit)
    images, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    a = one_step(cfg, vit, sources, images, labels, seed=1)
    b = one_step(cfg, vit, sources, images, labels, seed=12345)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
