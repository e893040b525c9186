"""The MTO paper's Fig. 1: heterogeneity H^l between mask and visible tokens at every layer.

    python pretrain.py --config configs/fmnist_simmim.yaml         # baseline
    python pretrain.py --config configs/fmnist_simmim_mto.yaml     # + MTO, same budget
    python experiments/heterogeneity.py \
        "checkpoints=[runs/fmnist_simmim/checkpoint.pth,runs/fmnist_simmim_mto/checkpoint.pth]" \
        "labels=[SimMIM,SimMIM + MTO]" out_dir=runs/heterogeneity_simmim

Each file is a run's checkpoint.pth (any framework: for MAE, H^l runs over the decoder blocks,
where its mask tokens are; otherwise over the encoder blocks) or an encoder.pth (the encoder
blocks with the encoder's e_[M]; the run's config.yaml next to it says which data and mask).
Every run is measured on the first `num_images` validation images, each with the mask its own
pre-training would draw (seeded per image, so two runs with the same mask settings share masks).

Writes out_dir/heterogeneity.csv (layer, then per run the mean and std over images of H^l) and
out_dir/heterogeneity.png (H^l against depth, one line per run; dashed: log |V|, the maximum).
H^l = losses.heterogeneity (Eq. 2) on X^l, the tokens block l's attention sees (layer 0 = the
initial embedding, the last = the final-normed output), [cls] left out.
"""
import csv
import math
import os
import sys
from dataclasses import dataclass, field, fields
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import yaml  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
import pretrain  # noqa: E402
from common import (ConfigError, make_config, parse_config, print0,  # noqa: E402
                    read_torch_file, run_main, setup_distributed)


@dataclass
class Config:
    checkpoints: List[str] = field(default_factory=list)  # checkpoint.pth or encoder.pth, one a run
    labels: List[str] = field(default_factory=list)       # legend names (default: run folder names)
    num_images: int = 256              # validation images (each with its own mask)
    batch_size: int = 64
    seed: int = 0                      # mask seed (per image, as in pre-training)
    data_path: str = ""                # '' = each run's data_path
    mask_ratio: float = 0.0            # 0 = each run's mask_ratio
    out_dir: str = "runs/heterogeneity"
    device: str = "auto"               # auto | cpu | cuda

    def validate(self):
        if not self.checkpoints:
            raise ConfigError("give the runs to compare: "
                              "checkpoints=[runs/A/checkpoint.pth,runs/B/checkpoint.pth]")
        if self.labels and len(self.labels) != len(self.checkpoints):
            raise ConfigError(f"{len(self.labels)} labels for {len(self.checkpoints)} checkpoints")
        if self.num_images < 1 or self.batch_size < 1:
            raise ConfigError("config keys 'num_images' and 'batch_size' must be >= 1")
        if not 0 <= self.mask_ratio < 1:
            raise ConfigError(f"config key 'mask_ratio' must be in [0, 1), got {self.mask_ratio}")


# -----------------------------------------------------------------------------
# A run: the blocks that hold the mask tokens, and the run's pre-training config

def load_run(path: str):
    """checkpoint.pth or encoder.pth -> (net, run config): net is a ViT (mask tokens in the encoder)
    or an MAE (mask tokens in the decoder), in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{path}' does not exist: give a checkpoint.pth or encoder.pth "
                                "written by pretrain.py")
    ckpt = read_weights_or_checkpoint(path)
    if "optimizer" in ckpt:  # a full checkpoint: the run's config is inside
        run = recorded_config(pretrain.Config, ckpt["config"])
        encoder = pretrain.build_encoder(run)
        if run.framework == "mae":
            net = pretrain.build_mim(run, encoder)
            net.load_state_dict(ckpt["model"], strict=True)
        else:  # distill or simmim: the encoder's weights, without the student's head
            state = {k[len("encoder."):]: v for k, v in ckpt["model"].items()
                     if k.startswith("encoder.")}
            encoder.load_state_dict(state, strict=True)
            net = encoder
        return net.eval(), run
    config_file = os.path.join(os.path.dirname(path), "config.yaml")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"'{path}' is an encoder file without the run's config.yaml "
                                "next to it")
    with open(config_file) as f:
        run = recorded_config(pretrain.Config, yaml.safe_load(f))
    if run.framework == "mae":
        raise ConfigError(f"'{path}' is the encoder of an MAE run, which never sees mask tokens: "
                          "give the run's checkpoint.pth (its decoder holds them)")
    return M.load_encoder(path).eval(), run


def recorded_config(cls, saved: dict):
    """A run's recorded config as `cls`; keys that cls no longer has (older runs) are dropped."""
    known = {f.name for f in fields(cls)}
    return make_config(cls, {k: v for k, v in saved.items() if k in known})


def read_weights_or_checkpoint(path: str) -> dict:
    """torch.load with weights_only=True (tensors and plain values, never code); one line if not."""
    try:
        return read_torch_file(path)
    except ValueError as e:
        raise ConfigError(f"cannot read '{path}': {e}") from None


def masked_images(run, cfg: Config, img_size: int, grid: int):
    """The first num_images validation images (B, C, H, W) and their masks (B, N), as the run
    masks them."""
    val = data.build_dataset(run.dataset, cfg.data_path or run.data_path, train=False,
                             transform=data.eval_transform(img_size), subset=cfg.num_images)
    ds = data.MaskedImages(val, grid, cfg.mask_ratio or run.mask_ratio, run.mask,
                           run.mask_min_patches, cfg.seed,
                           mask_cell=run.mask_patch_size // run.patch_size)
    samples = [ds[i] for i in range(len(ds))]
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


@torch.no_grad()
def layer_heterogeneity(net, images: torch.Tensor, masks: torch.Tensor,
                        batch_size: int = 64) -> torch.Tensor:
    """H^l for every image and layer: (L+1, num_images), layer 0 = the initial embedding."""
    per_batch = []
    for x, m in zip(images.split(batch_size), masks.split(batch_size)):
        if isinstance(net, M.MAE):
            _, X = net(x, m, return_hiddens=True)                    # decoder X^l, (b, 1+N, D_dec)
        else:
            X = net.forward_intermediates(x, m)[1].X                 # encoder X^l, (b, 1+N, D)
        H = [losses.heterogeneity(X_l[:, 1:], m) for X_l in X]       # [cls] left out
        per_batch.append(torch.stack(H))                             # (L+1, b)
    return torch.cat(per_batch, dim=1)


def run_heterogeneity(path: str, cfg: Config, device="cpu"):
    """One run's checkpoint.pth or encoder.pth -> (H^l per layer and image (L+1, num_images),
    log |V|, a one-line description). The images and masks are as the run's pre-training draws
    them."""
    net, run = load_run(path)
    vit = net.encoder if isinstance(net, M.MAE) else net
    images, masks = masked_images(run, cfg, vit.cfg.img_size, vit.cfg.grid)
    curve = layer_heterogeneity(net.to(device), images.to(device), masks.to(device),
                                cfg.batch_size).cpu()
    where = "decoder" if isinstance(net, M.MAE) else "encoder"
    note = (f"{run.framework}, H^l over the {where} blocks, {len(images)} images, "
            f"|M| = {int(masks[0].sum())}, |V| = {int((~masks[0]).sum())}")
    return curve, math.log(int((~masks[0]).sum())), note


# -----------------------------------------------------------------------------
# Files

def write_csv(curves: dict, path: str):
    """curves {label: (L+1, num_images)} -> rows: layer, then '<label>' (mean) and '<label> std'."""
    depth = max(h.shape[0] for h in curves.values())
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layer"] + [c for label in curves for c in (label, f"{label} std")])
        for l in range(depth):
            row = [l]
            for h in curves.values():
                row += [f"{h[l].mean():.6f}", f"{h[l].std():.6f}"] if l < h.shape[0] else ["", ""]
            writer.writerow(row)


def draw(ax, curves: dict, log_visible: dict, title: str = "mask vs visible tokens, Eq. 2"):
    """H^l against depth on a matplotlib axis: one line per run (curves {label: (L+1, n)}), and
    dashed lines at log |V| (log_visible {label: value}), the maximum."""
    from matplotlib.ticker import MaxNLocator
    for label, h in curves.items():
        ax.plot(range(h.shape[0]), h.mean(1).numpy(), marker="o", label=label)
    for i, value in enumerate(sorted(set(log_visible.values()))):
        ax.axhline(value, color="grey", ls="--", lw=1,
                   label="log |V| (uniform rows)" if i == 0 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer depth (0 = initial embedding)")
    ax.set_ylabel("heterogeneity H (nats)")
    ax.set_title(title)
    ax.legend(fontsize=8)


def plot(curves: dict, log_visible: dict, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    draw(ax, curves, log_visible)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    cfg = parse_config(Config, argv)
    device = setup_distributed(cfg.device).device  # one process: the analysis is cheap
    os.makedirs(cfg.out_dir, exist_ok=True)
    labels = cfg.labels or [os.path.basename(os.path.dirname(os.path.abspath(p)))
                            for p in cfg.checkpoints]
    curves, log_visible = {}, {}
    for label, path in zip(labels, cfg.checkpoints):
        curves[label], log_visible[label], note = run_heterogeneity(path, cfg, device)
        print0(f"{label}: {path} ({note})")
    write_csv(curves, os.path.join(cfg.out_dir, "heterogeneity.csv"))
    plot(curves, log_visible, os.path.join(cfg.out_dir, "heterogeneity.png"))
    print0("layer " + " ".join(f"{label:>14}" for label in curves))
    for l in range(max(h.shape[0] for h in curves.values())):
        cells = [f"{h[l].mean():>14.4f}" if l < h.shape[0] else " " * 14 for h in curves.values()]
        print0(f"{l:>5} " + " ".join(cells))
    print0(f"done: {cfg.out_dir}/heterogeneity.csv, heterogeneity.png")


if __name__ == "__main__":
    run_main(main)
