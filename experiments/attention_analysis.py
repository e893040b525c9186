"""The information flow in a frozen ViT (Beyond [cls]): per-block attention statistics and maps.

    python pretrain.py --config configs/fmnist_dtm.yaml                   # the encoder
    python probe.py --config configs/fmnist_probe.yaml                    # trains the AbMILP head
    python experiments/attention_analysis.py --config configs/fmnist_probe.yaml

It reads the probe's config (same keys, plus the three below) and writes to out_dir/analysis/:
    attention_stats.csv  per block, averaged over heads and images: [cls]->[cls] attention,
                         [cls]->patches attention mass, entropy of the [cls] row over the patches
                         (renormalised without the [cls] column), mean entropy of the patch rows
                         (over all 1+N keys), ||attention output|| / ||residual|| for [cls] and
                         for the patches
    attention_stats.png  the same over depth
    attention_maps.png   validation images with the AbMILP attention (from out_dir/heads.pth) and
                         the last block's [cls] attention over the patches overlaid

On your own checkpoint (entropies in nats; uniform attention over N patches has log N):
    from experiments.attention_analysis import information_flow
    rows = information_flow(vit, images)   # one dict per block: {"block": l, "cls_to_cls": ...}
"""
import csv
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
import probe  # noqa: E402
from common import ConfigError, parse_config, print0, run_main, setup_distributed  # noqa: E402

STATS = ("cls_to_cls", "cls_to_patches", "cls_entropy", "patch_entropy", "cls_norm_ratio",
         "patch_norm_ratio")


@dataclass
class Config(probe.Config):
    num_images: int = 512              # validation images the statistics average over
    map_images: int = 8                # images in the attention-map grid
    analysis_dir: str = ""             # where the CSV and PNGs go ('' = out_dir/analysis)

    def validate(self):
        super().validate()
        if self.num_images < 1 or self.map_images < 1:
            raise ConfigError("config keys 'num_images' and 'map_images' must be >= 1")


# -----------------------------------------------------------------------------
# Statistics

def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats of the distributions along `dim` (0 log 0 = 0)."""
    return -(p * p.clamp_min(1e-30).log()).sum(dim)


def attention_stats(attn: torch.Tensor, attn_out: torch.Tensor, residual: torch.Tensor) -> dict:
    """One block's statistics per image, averaged over heads (and patches): {name: (B,)}.

    attn (B, H, 1+N, 1+N): rows are queries, [cls] first; attn_out (B, 1+N, D): the attention
    branch added to the residual stream; residual (B, 1+N, D): the stream entering the block.
    """
    cls_row = attn[:, :, 0]                                          # (B, H, 1+N)
    to_patches = cls_row[..., 1:].sum(-1)                            # (B, H)
    cls_over_patches = cls_row[..., 1:] / to_patches.unsqueeze(-1)   # renormalised without [cls]
    ratio = attn_out.norm(dim=-1) / residual.norm(dim=-1)            # (B, 1+N)
    return {
        "cls_to_cls": cls_row[..., 0].mean(1),
        "cls_to_patches": to_patches.mean(1),
        "cls_entropy": entropy(cls_over_patches).mean(1),
        "patch_entropy": entropy(attn[:, :, 1:]).mean((1, 2)),       # patch rows, over all 1+N keys
        "cls_norm_ratio": ratio[:, 0],
        "patch_norm_ratio": ratio[:, 1:].mean(1),
    }


@torch.no_grad()
def information_flow(vit, images: torch.Tensor, batch_size: int = 64) -> list:
    """Per block of `vit`, the statistics averaged over heads and all images (B, C, H, W)."""
    vit.eval()
    per_block = [defaultdict(list) for _ in vit.blocks]
    for x in images.split(batch_size):
        _, layers = vit.forward_intermediates(x, attn=True)
        for l, stats in enumerate(per_block):
            block_stats = attention_stats(layers.attn[l], layers.attn_out[l], layers.residual[l])
            for name, v in block_stats.items():
                stats[name].append(v)
    return [{"block": l, **{n: torch.cat(stats[n]).mean().item() for n in STATS}}
            for l, stats in enumerate(per_block)]


@torch.no_grad()
def cls_attention_map(vit, images: torch.Tensor) -> torch.Tensor:
    """The last block's [cls] attention over the patches, mean over heads, renormalised: (B, N)."""
    vit.eval()
    _, layers = vit.forward_intermediates(images, attn=True)
    a = layers.attn[-1][:, :, 0, 1:].mean(1)                         # (B, N)
    return a / a.sum(-1, keepdim=True)


@torch.no_grad()
def abmilp_map(abmilp, vit, images: torch.Tensor, cfg) -> torch.Tensor:
    """AbMILP's attention over the patch tokens of the probe's features: (B, N)."""
    abmilp.eval()
    tokens = probe.frozen_tokens(vit, images, cfg.block, cfg.final_norm)  # (B, 1+N, D)
    return abmilp(tokens[:, 1:])[1]


# -----------------------------------------------------------------------------
# Files

def write_csv(rows: list, path: str):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["block", *STATS])
        writer.writeheader()
        writer.writerows(rows)


def plot_stats(rows: list, num_patches: int, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    blocks = [r["block"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("attention of [cls]", [("cls_to_cls", "[cls] -> [cls]"),
                                      ("cls_to_patches", "[cls] -> patches")]),
              ("entropy (nats)", [("cls_entropy", "[cls] row over patches"),
                                  ("patch_entropy", "patch rows")]),
              ("||attention out|| / ||residual||", [("cls_norm_ratio", "[cls]"),
                                                    ("patch_norm_ratio", "patches")])]
    for ax, (title, curves) in zip(axes, panels):
        for key, label in curves:
            ax.plot(blocks, [r[key] for r in rows], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("block")
    axes[1].axhline(math.log(num_patches), color="grey", ls="--", lw=1,
                    label="uniform over patches")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_maps(images: torch.Tensor, maps: dict, grid: int, path: str):
    """One row per image: the image, then each map (B, N) upsampled and overlaid (min-max
    scaled)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pictures = data.denormalize(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    B, H, W, _ = pictures.shape
    fig, axes = plt.subplots(B, 1 + len(maps), figsize=(2 * (1 + len(maps)), 2 * B), squeeze=False)
    for i in range(B):
        axes[i, 0].imshow(pictures[i])
        for j, (name, m) in enumerate(maps.items(), start=1):
            cells = m[i].view(1, 1, grid, grid).float().cpu()                # (1, 1, g, g)
            up = F.interpolate(cells, size=(H, W), mode="nearest")[0, 0]      # (H, W)
            up = ((up - up.min()) / (up.max() - up.min() + 1e-12)).numpy()
            axes[i, j].imshow(pictures[i])
            axes[i, j].imshow(up, cmap="jet", alpha=0.5)
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    cfg = parse_config(Config, argv)
    device = setup_distributed(cfg.device).device  # one process: the analysis is cheap
    out = cfg.analysis_dir or os.path.join(cfg.out_dir, "analysis")
    os.makedirs(out, exist_ok=True)

    # -------------------------------------------------------------------------
    # Backbone and the first validation images
    vit = probe.load_backbone(cfg).to(device)
    val = data.build_dataset(cfg.dataset, cfg.data_path, train=False,
                             transform=data.eval_transform(vit.cfg.img_size), subset=cfg.val_subset)
    n = min(cfg.num_images, len(val))
    images = torch.stack([val[i][0] for i in range(n)]).to(device)   # (n, C, H, W)
    print0(f"backbone {cfg.backbone}: {len(vit.blocks)} blocks; "
           f"statistics over {n} validation images")

    # -------------------------------------------------------------------------
    # Statistics per block: CSV and plot
    rows = information_flow(vit, images)
    write_csv(rows, os.path.join(out, "attention_stats.csv"))
    plot_stats(rows, vit.num_patches, os.path.join(out, "attention_stats.png"))
    print0(f"{'block':>5} " + " ".join(f"{s:>16}" for s in STATS))
    for r in rows:
        print0(f"{r['block']:>5} " + " ".join(f"{r[s]:>16.4f}" for s in STATS))
    print0(f"uniform attention over the {vit.num_patches} patches has entropy "
           f"{math.log(vit.num_patches):.4f}")

    # -------------------------------------------------------------------------
    # Attention maps: AbMILP (the probe's trained head) and the last block's [cls]
    shown = images[: cfg.map_images]
    maps = {}
    if "abmilp" in cfg.heads:
        heads = probe.load_heads(os.path.join(cfg.out_dir, "heads.pth"), cfg, vit,
                                 probe.num_classes_of(val)).to(device)
        maps["AbMILP (probe)"] = abmilp_map(heads["abmilp"].abmilp, vit, shown, cfg)
    maps["[cls], last block"] = cls_attention_map(vit, shown)
    plot_maps(shown, maps, vit.cfg.grid, os.path.join(out, "attention_maps.png"))
    print0(f"done: {out}/attention_stats.csv, attention_stats.png, attention_maps.png")


if __name__ == "__main__":
    run_main(main)
