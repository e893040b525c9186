"""DECISIONS.md kept honest: the recipes' learning rates and pre-training details, the MTO
choices the configs must state, the K-Means input, the probe block's own attention, losses.py's
imports, and every test the decisions file names exists."""
import ast
import math
import os
import re

import pytest
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(name):
    with open(os.path.join(ROOT, "configs", name)) as f:
        return yaml.safe_load(f)


def effective_lr(cfg):
    """The rule of DECISIONS.md 1: lr > 0 is the peak rate as given, else blr * batch / 256."""
    return cfg["lr"] if cfg.get("lr", 0) > 0 else cfg["blr"] * cfg["batch_size"] / 256


# (config, the paper's batch, the paper's effective peak lr): DECISIONS.md 1, by hand
RECIPES = [
    ("in1k_vit_small_dtm.yaml", 1024, 1.5e-4),     # DTM Table 12
    ("in1k_vit_base_dtm.yaml", 1024, 1.5e-4),
    ("in1k_vit_large_dtm.yaml", 1024, 1.5e-4),
    ("in1k_vit_small_finetune.yaml", 1024, 5e-4),  # DTM Table 13
    ("in1k_vit_base_finetune.yaml", 1024, 5e-4),
    ("in1k_vit_large_finetune.yaml", 1024, 5e-4),
    ("in1k_vit_base_mae_mto.yaml", 4096, 2.4e-3),  # MAE: 1.5e-4 * 4096 / 256
    ("in1k_vit_base_simmim_mto.yaml", 2048, 4e-4),  # SimMIM: 1e-4 * 2048 / 512
]


@pytest.mark.parametrize("name, batch, lr", RECIPES)
def test_recipe_configs_give_the_papers_effective_lr(name, batch, lr):
    cfg = config(name)
    assert cfg["batch_size"] == batch
    assert effective_lr(cfg) == pytest.approx(lr, rel=1e-12)
    with open(os.path.join(ROOT, "configs", name)) as f:
        text = f.read()
    assert re.search(r"Table 1[23]|Sec\. 5\.2", text), f"{name} does not name its source"
    # DTM's recipes take the lr as given (BEiT v2); MAE's and SimMIM's scale a base lr
    assert ("dtm" in name or "finetune" in name) == (cfg.get("lr", 0) > 0)


def test_every_imagenet_recipe_is_in_the_table_above():
    shipped = {f for f in os.listdir(os.path.join(ROOT, "configs")) if f.startswith("in1k_")}
    assert shipped == {name for name, _, _ in RECIPES}


@pytest.mark.parametrize("size, layer_scale", [("small", 0.1), ("base", 0.1), ("large", 1e-5)])
def test_dtm_pretraining_configs_follow_table_12_and_beit_v2(size, layer_scale):
    cfg = config(f"in1k_vit_{size}_dtm.yaml")
    assert cfg["rel_pos_bias"] and cfg["shared_rel_pos_bias"]      # Table 12 ticks both
    assert cfg["crop_scale_min"] == 0.2 and cfg["min_lr"] == 1e-5     # BEiT v2 commands, scripts
    assert cfg["layer_scale"] == layer_scale and cfg["drop_path"] == 0.0
    schedule = (cfg["epochs"], cfg["warmup_epochs"], cfg["beta2"], cfg["clip_grad"])
    assert schedule == (300, 10, 0.98, 3.0)
    import data
    assert data.num_masked_patches(196, cfg["mask_ratio"]) == 75       # BEiT v2's 75 of 196
    assert data.num_masked_patches(196, 0.4) == 78                    # the text's 0.4: not it
    assert cfg["distance"] == "cosine" and cfg["dtm_levels"] == 2 and cfg["dtm_max_iters"] == 14


@pytest.mark.parametrize("size, epochs, warmup, decay, drop_path",
                         [("small", 300, 10, 0.6, 0.1), ("base", 100, 10, 0.6, 0.1),
                          ("large", 50, 5, 0.8, 0.2)])
def test_finetuning_configs_carry_table_13(size, epochs, warmup, decay, drop_path):
    cfg = config(f"in1k_vit_{size}_finetune.yaml")
    assert (cfg["epochs"], cfg["warmup_epochs"], cfg["layer_decay"], cfg["drop_path"]) == (
        epochs, warmup, decay, drop_path)
    assert (cfg["weight_decay"], cfg["label_smoothing"], cfg["reprob"]) == (0.05, 0.1, 0.25)
    augment = (cfg["mixup"], cfg["cutmix"], cfg["randaug_ops"], cfg["randaug_magnitude"])
    assert augment == (0.8, 1.0, 2, 9)
    assert cfg["rel_pos_bias"] and cfg["img_size"] == 224 and cfg["patch_size"] == 16
    assert cfg["global_pool"] == "avg"                                # BEiT v2's mean pooling
    import finetune
    from common import parse_config
    path = os.path.join(ROOT, "configs", f"in1k_vit_{size}_finetune.yaml")
    parsed = parse_config(finetune.Config, ["--config", path])
    assert finetune.peak_lr(parsed)[0] == 5e-4                       # Table 13, as given


def decisions_text():
    with open(os.path.join(ROOT, "DECISIONS.md"), encoding="utf-8") as f:
        return f.read()


def test_fix_init_is_on_for_the_beit_and_simmim_recipes_and_off_for_mae():
    # DECISIONS.md 2: BEiT v2 / DTM and SimMIM rescale the output projections at init, MAE not
    for name, _, _ in RECIPES:
        if "finetune" not in name:
            assert config(name)["fix_init"] is ("mae" not in name), name


def mto_configs():
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))
    return [f for f in names if "mto" in f or config(f).get("mto")]


def test_every_mto_config_states_the_l_spa_diagonal_decision():
    """DECISIONS.md 6: Eq. 3 keeps j = i. The default and every MTO config say so, explicitly."""
    stated = set(re.findall(r"`mto_spa_exclude_self: (true|false)`", decisions_text()))
    assert len(stated) == 1, stated
    value = stated.pop() == "true"
    import pretrain
    assert pretrain.Config().mto_spa_exclude_self is value
    names = mto_configs()
    assert len(names) == 4, names
    for name in names:
        assert config(name).get("mto_spa_exclude_self", "missing") is value, name
        with open(os.path.join(ROOT, "configs", name)) as f:
            line = next(x for x in f if x.startswith("mto_spa_exclude_self:"))
        assert "# " in line and "Eq. 3" in line, f"{name}: say why, in one line"


def test_ranking_loss_sums_the_layers_as_eq_5_prints():
    """DECISIONS.md 6: L_r = sum over l = 1..L (Eq. 5, Algorithm 1), not the mean over L."""
    import losses
    for num_layers in (1, 4, 12):
        flat = torch.ones(num_layers + 1, 3)                          # H^0..H^L, 3 images
        assert losses.ranking_loss(flat).item() == pytest.approx(num_layers * math.log(2))
    H = torch.tensor([2.0, 1.0, 1.5])                                 # steps -1.0, +0.5
    by_hand = math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))
    assert losses.ranking_loss(H).item() == pytest.approx(by_hand, rel=1e-6)


def test_kmeans_reads_the_detached_target(monkeypatch):
    """DECISIONS.md 4: the K-Means clusters come from the detached teacher tokens v, as the
    bipartite matching's do, and the same ids morph u and v."""
    import losses
    seen, real = [], losses.kmeans_assignment

    def spy(target, num_morphed, num_iters):
        seen.append((target, real(target, num_morphed, num_iters)))
        return seen[-1][1]

    monkeypatch.setattr(losses, "kmeans_assignment", spy)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 20, 6, generator=g, requires_grad=True)
    u = torch.randn(2, 20, 6, generator=g, requires_grad=True)
    losses.dtm_loss(u, v, [(6, 3)], matching="kmeans")
    ((target, ids),) = seen
    assert not target.requires_grad and torch.equal(target, v.detach())
    assert not torch.equal(real(u.detach(), 6, 3), ids)              # from u they would differ


def test_probe_block_matches_the_model_it_no_longer_imports():
    import losses
    import model as M
    torch.manual_seed(0)
    ours = losses.SelfAttention(16)
    torch.manual_seed(0)
    theirs = M.Attention(16, num_heads=1, qkv_bias=True, grid=None)
    # same parameter names, and the same initial weights from the same seed
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key
    x = torch.randn(3, 10, 16)
    assert torch.equal(ours(x), theirs(x)[0])
    for dim, grid in ((16, 4), (32, 7)):
        assert torch.equal(losses.sincos_table(dim, grid), M.sincos_pos_embed(dim, grid)[1:])


def test_losses_imports_only_torch_and_keeps_lines_short():
    path = os.path.join(ROOT, "losses.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    allowed = {"math", "random", "typing", "torch", "torch.nn", "torch.nn.functional"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            assert {a.name for a in node.names} <= allowed, ast.dump(node)
        elif isinstance(node, ast.ImportFrom):
            assert node.module in allowed, node.module
    long = [i + 1 for i, line in enumerate(source.splitlines()) if len(line) > 100]
    assert not long, f"losses.py lines over 100 characters: {long}"
    # each method's section names its paper by arXiv id
    for arxiv in ("2401.00254", "2404.08330", "2412.03215"):
        assert f"arXiv:{arxiv}" in source


def test_every_test_named_in_decisions_exists():
    with open(os.path.join(ROOT, "DECISIONS.md"), encoding="utf-8") as f:
        text = f.read()
    named = set(re.findall(r"tests/(test_\w+\.py)::(test_\w+)", text))
    assert len(named) >= 15
    for file, test in sorted(named):
        with open(os.path.join(ROOT, "tests", file)) as f:
            assert re.search(rf"^def {test}\(", f.read(), re.M), f"{file}::{test} is gone"
    assert "../shared" not in text and "NOTES.md" not in text
