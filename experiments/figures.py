"""Figures of the small-scale experiments, each a function you can call on your own checkpoints.

    python experiments/small_scale.py --quick --out /tmp/ss  # draws them all into /tmp/ss/figures
    python experiments/figures.py experiments/results.json   # redraw from a finished run's results

On your own runs (every function takes tensors or file paths and writes one PNG):
    from experiments import figures
    images = figures.fashion_images(6, img_size=32)                          # (6, 3, 32, 32)
    figures.plot_masks(images, figures.example_masks(6, grid=8), grid=8, path="masks.png")
    teacher = model.CNNTeacher(model.load_cnn("runs/fmnist_dtm/teacher_cnn.pth"), img_size=28)
    figures.plot_token_morphing(teacher, images28, "morph.png")   # or model.ViTTeacher(encoder)
    figures.plot_heterogeneity({"SimMIM": {"baseline": "runs/a/checkpoint.pth",
                                           "+ MTO": "runs/b/checkpoint.pth"}},
                               "heterogeneity.png")
    figures.plot_beyond_cls("runs/a/encoder.pth", "runs/a/probe/heads.pth", images, "beyond_cls")
    figures.plot_learning_curves({"SimMIM": {"baseline": [[(1, 0.61), (2, 0.66)]]}}, "curves.png")

Nothing here re-implements an analysis: H^l comes from experiments/heterogeneity.py, the attention
maps and per-block statistics from experiments/attention_analysis.py, the morphing from
losses.dtm_assignment and the masks from data.py.
"""
import json
import math
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "experiments")):
    if path not in sys.path:
        sys.path.insert(0, path)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attention_analysis  # noqa: E402
import data  # noqa: E402
import heterogeneity  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
import probe  # noqa: E402


# -----------------------------------------------------------------------------
# Inputs

def fashion_images(n: int, img_size: int, data_path: str = "data") -> torch.Tensor:
    """The first n Fashion-MNIST test images, eval transform (ImageNet-normalised):
    (n, 3, H, W)."""
    val = data.build_dataset("fashion_mnist", data_path, train=False,
                             transform=data.eval_transform(img_size), subset=n)
    return torch.stack([val[i][0] for i in range(len(val))])


def example_masks(n: int, grid: int, seed: int = 0, block_ratio: float = 0.4,
                  block_min_patches: int = 4, random_ratio: float = 0.75,
                  simmim_ratio: float = 0.6, simmim_cell: int = 2) -> dict:
    """n masks of each kind on a grid x grid patch map: {name: (n, N) bool}. Defaults: the
    Fashion-MNIST configs (fmnist_dtm block-wise, fmnist_mae random, fmnist_simmim 2 x 2-patch
    cells)."""
    N = grid * grid
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    num_block = data.num_masked_patches(N, block_ratio)
    num_random = data.num_masked_patches(N, random_ratio)
    cells = data.simmim_num_cells(grid, simmim_cell, simmim_ratio)
    block = [data.block_mask(grid, num_block, block_min_patches, rng=rng) for _ in range(n)]
    return {
        f"block-wise (BEiT/DTM), {num_block} of {N}": torch.stack(block),
        f"random (MAE), {num_random} of {N}": data.random_mask(n, N, num_random, generator=gen),
        f"SimMIM cells, {cells * simmim_cell ** 2} of {N}":
            torch.stack([data.simmim_mask(grid, simmim_cell, cells, generator=gen)
                         for _ in range(n)]),
    }


def upsample(per_patch: torch.Tensor, grid: int, size: int) -> np.ndarray:
    """(B, N) per-patch values -> (B, size, size) pixels, nearest (each patch a flat square)."""
    x = per_patch.view(-1, 1, grid, grid).float().cpu()
    return F.interpolate(x, size=(size, size), mode="nearest")[:, 0].numpy()


def pictures(images: torch.Tensor) -> np.ndarray:
    """Normalised (B, 3, H, W) -> displayable (B, H, W, 3) in [0, 1]."""
    return data.denormalize(images).permute(0, 2, 3, 1).cpu().numpy()


def save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------
# Masks and token morphing

def plot_masks(images: torch.Tensor, masks: dict, grid: int, path: str) -> str:
    """One row per image: the image, then each mask kind (masked patches shaded red)."""
    pics = pictures(images)
    B, H = pics.shape[:2]
    fig, axes = plt.subplots(B, 1 + len(masks), figsize=(1.9 * (1 + len(masks)), 1.9 * B),
                             squeeze=False)
    for j, (name, m) in enumerate(masks.items(), start=1):
        up = upsample(m[:B], grid, H)                                   # (B, H, W) in {0, 1}
        for i in range(B):
            shade = np.zeros((H, H, 4))
            shade[..., 0], shade[..., 3] = 1.0, 0.6 * up[i]
            axes[i, j].imshow(pics[i])
            axes[i, j].imshow(shade)
            if i == 0:
                axes[i, j].set_title(name, fontsize=8)
    for i in range(B):
        axes[i, 0].imshow(pics[i])
    for ax in axes.flat:
        ax.axis("off")
    return save(fig, path)


def cluster_colours(num_clusters: int, seed: int = 0) -> np.ndarray:
    """(num_clusters, 3) distinct colours: tab20 when it suffices, else shuffled hues."""
    if num_clusters <= 20:
        return plt.get_cmap("tab20")(np.arange(num_clusters))[:, :3]
    hues = plt.get_cmap("hsv")(np.linspace(0, 1, num_clusters, endpoint=False))[:, :3]
    return hues[np.random.default_rng(seed).permutation(num_clusters)]


@torch.no_grad()
def plot_token_morphing(teacher: M.Teacher, images: torch.Tensor, path: str,
                        num_morphed=(24, 12, 6, 3), num_iters: int = 2) -> str:
    """The teacher's patch tokens grouped by DTM's bipartite matching (losses.dtm_assignment) at
    several N_m: one colour per morphed token over the image. teacher: a model.Teacher on a
    square grid of tokens (model.CNNTeacher, model.ViTTeacher), whose tokens are the
    distillation targets."""
    targets = teacher.eval()(images)                                    # (B, N, D)
    N = teacher.num_patches
    grid = math.isqrt(N)
    pics = pictures(images)
    B, H = pics.shape[:2]
    columns = 1 + len(num_morphed)
    fig, axes = plt.subplots(B, columns, figsize=(1.9 * columns, 1.9 * B), squeeze=False)
    for j, n_m in enumerate(num_morphed, start=1):
        assign = losses.dtm_assignment(targets, min(n_m, N), num_iters)  # (B, N) cluster ids
        colours = cluster_colours(min(n_m, N))
        up = upsample(assign, grid, H).astype(int)                      # (B, H, W) cluster ids
        for i in range(B):
            axes[i, j].imshow(pics[i])
            axes[i, j].imshow(colours[up[i]], alpha=0.55)
            if i == 0:
                axes[i, j].set_title(f"N_m = {min(n_m, N)} of {N}, k = {num_iters}", fontsize=8)
    for i in range(B):
        axes[i, 0].imshow(pics[i])
    for ax in axes.flat:
        ax.axis("off")
    return save(fig, path)


# -----------------------------------------------------------------------------
# MTO: heterogeneity per layer, learning curves

def heterogeneity_curves(checkpoints: dict, num_images: int = 256, seed: int = 0,
                         data_path: str = ""):
    """{label: checkpoint.pth (MAE: its decoder holds the mask tokens) or encoder.pth} ->
    ({label: H^l per layer and image (L+1, num_images)}, {label: log |V|}), via
    experiments/heterogeneity.py."""
    cfg = heterogeneity.Config(checkpoints=list(checkpoints.values()), num_images=num_images,
                               seed=seed, data_path=data_path)
    curves, log_visible = {}, {}
    for label, path in checkpoints.items():
        curves[label], log_visible[label], _ = heterogeneity.run_heterogeneity(path, cfg)
    return curves, log_visible


def plot_heterogeneity(panels: dict, path: str, num_images: int = 256,
                       log_visible: dict = None) -> str:
    """panels {title: {label: checkpoint path, or a precomputed H^l tensor (L+1, n)}}: one panel
    per title (e.g. SimMIM and MAE), H^l against depth, baseline vs MTO
    (experiments/heterogeneity.draw). log_visible {title: log |V|} draws the maximum for
    precomputed curves."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        paths = {k: v for k, v in runs.items() if isinstance(v, str)}
        curves, logv = heterogeneity_curves(paths, num_images) if paths else ({}, {})
        curves.update({k: v for k, v in runs.items() if not isinstance(v, str)})
        if log_visible and title in log_visible:
            logv[title] = log_visible[title]
        heterogeneity.draw(ax, curves, logv, title=f"{title}: mask vs visible tokens (Eq. 2)")
    return save(fig, path)


def plot_learning_curves(panels: dict, path: str, ylabel: str = "k-NN top-1 (%)") -> str:
    """panels {title: {label: [curve per seed, each [(epoch, accuracy), ...]]}}: the mean over seeds
    with the seeds' min-max band."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for label, seeds in runs.items():
            epochs = sorted(set.intersection(*(set(e for e, _ in c) for c in seeds)))
            values = np.array([[dict(c)[e] for e in epochs] for c in seeds])  # (seeds, epochs)
            line, = ax.plot(epochs, values.mean(0), marker="o",
                            label=f"{label} ({len(seeds)} seed(s))")
            if len(seeds) > 1:
                ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(),
                                alpha=0.2)
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    return save(fig, path)


# -----------------------------------------------------------------------------
# Beyond [cls]: AbMILP vs [cls] attention maps and per-block attention statistics

def load_probe_heads(backbone: str, heads_path: str, num_classes: int = 10):
    """An encoder.pth and the probe heads probe.py trained on it -> (vit, heads, probe config)."""
    vit = M.load_encoder(backbone).eval().requires_grad_(False)
    saved = torch.load(heads_path, map_location="cpu", weights_only=True)
    cfg = heterogeneity.recorded_config(probe.Config, saved["config"])
    return vit, probe.load_heads(heads_path, cfg, vit, num_classes), cfg


def plot_beyond_cls(backbone: str, heads_path: str, images: torch.Tensor, prefix: str,
                    stats_images=None, num_classes: int = 10) -> list:
    """prefix_maps.png: AbMILP's attention (the probe's trained head) and the last block's [cls]
    attention over the same images; prefix_stats.png: attention statistics per block over
    stats_images (default: images). Both drawn by experiments/attention_analysis.py."""
    vit, heads, cfg = load_probe_heads(backbone, heads_path, num_classes)
    maps = {}
    if "abmilp" in heads:
        maps["AbMILP (probe)"] = attention_analysis.abmilp_map(heads["abmilp"].abmilp, vit,
                                                               images, cfg)
    maps["[cls], last block"] = attention_analysis.cls_attention_map(vit, images)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    attention_analysis.plot_maps(images, maps, vit.cfg.grid, f"{prefix}_maps.png")
    stats_images = images if stats_images is None else stats_images
    rows = attention_analysis.information_flow(vit, stats_images)
    attention_analysis.plot_stats(rows, vit.num_patches, f"{prefix}_stats.png")
    return [f"{prefix}_maps.png", f"{prefix}_stats.png"]


# -----------------------------------------------------------------------------
# All figures of a small_scale.py run, from its results.json

def resolve(path: str) -> str:
    """Paths in results.json are relative to the repository root (or absolute)."""
    return path if os.path.isabs(path) else os.path.join(ROOT, path)


def first_seed(results: dict, variant: str):
    """The run record of a variant's first seed, or None if the variant did not run."""
    runs = [r for r in results["runs"].values() if r.get("variant") == variant]
    return min(runs, key=lambda r: r["seed"]) if runs else None


def curves_by_variant(results: dict, variants) -> dict:
    """{variant: [k-NN curve per seed]} for the variants that ran and logged a curve."""
    out = {}
    for v in variants:
        seeds = [r["knn_curve"] for r in results["runs"].values()
                 if r.get("variant") == v and r.get("knn_curve")]
        if seeds:
            out[v] = seeds
    return out


def load_teacher(record: dict) -> tuple:
    """The distillation teacher of a results.json -> (model.Teacher or None, input size): the
    SmallCNN file ('file', 'img_size') or, in older results, a ViT encoder."""
    if record.get("file"):
        size = record.get("img_size", 28)
        return M.CNNTeacher(M.load_cnn(resolve(record["file"])), size), size
    if record.get("encoder"):
        vit = M.load_encoder(resolve(record["encoder"]))
        return M.ViTTeacher(vit), vit.cfg.img_size
    return None, 0


def make_all(results: dict, fig_dir: str, num_images: int = 6, data_path: str = "data") -> list:
    """Every figure of the issue that the runs in `results` allow; returns the PNG paths."""
    made = []
    images32 = fashion_images(num_images, 32, data_path)
    images28 = fashion_images(num_images, 28, data_path)
    made.append(plot_masks(images32, example_masks(num_images, grid=8), 8,
                           os.path.join(fig_dir, "masks.png")))
    teacher, size = load_teacher(results.get("teacher", {}))
    if teacher is not None:
        images = images28 if size == 28 else fashion_images(num_images, size, data_path)
        made.append(plot_token_morphing(teacher, images,
                                        os.path.join(fig_dir, "token_morphing.png")))
    panels, log_visible, curves = {}, {}, {}
    for fw, title in (("simmim", "SimMIM"), ("mae", "MAE")):
        h = {label: [r["heterogeneity"] for r in results["runs"].values()
                     if r.get("variant") == v and r.get("heterogeneity")]
             for label, v in (("baseline", fw), ("+ MTO", f"{fw}_mto"))}
        if any(h.values()):  # (L+1, seeds): the line is the mean over seeds
            panels[title] = {label: torch.tensor([r["mean"] for r in seeds]).T
                             for label, seeds in h.items() if seeds}
            log_visible[title] = next(s for s in h.values() if s)[0]["log_visible"]
        runs = curves_by_variant(results, (fw, f"{fw}_mto"))
        if runs:
            curves[title] = {("baseline" if v == fw else "+ MTO"): c for v, c in runs.items()}
    distill = curves_by_variant(results, ("dtm", "tokenwise", "fixed", "downsample"))
    if distill:
        curves["distillation"] = distill
    if panels:
        made.append(plot_heterogeneity(panels, os.path.join(fig_dir, "heterogeneity.png"),
                                       log_visible=log_visible))
    if curves:
        made.append(plot_learning_curves(curves, os.path.join(fig_dir, "learning_curves.png")))
    for variant in ("dtm", "simmim", "mae"):
        run = first_seed(results, variant)
        if run and run.get("probe", {}).get("heads"):
            vit_size = M.load_encoder(resolve(run["encoder"])).cfg.img_size
            imgs = {32: images32, 28: images28}.get(vit_size)
            imgs = fashion_images(num_images, vit_size, data_path) if imgs is None else imgs
            many = fashion_images(256, vit_size, data_path)
            made += plot_beyond_cls(resolve(run["encoder"]), resolve(run["probe"]["heads"]), imgs,
                                    os.path.join(fig_dir, f"beyond_cls_{variant}"),
                                    stats_images=many)
    return made


def main(argv):
    if len(argv) != 1 or not os.path.isfile(argv[0]):
        sys.exit("usage: python experiments/figures.py OUT/results.json "
                 "(written by experiments/small_scale.py)")
    with open(argv[0]) as f:
        results = json.load(f)
    fig_dir = os.path.join(os.path.dirname(os.path.abspath(argv[0])), "figures")
    for path in make_all(results, fig_dir):
        print(path)


if __name__ == "__main__":
    main(sys.argv[1:])
