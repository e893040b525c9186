"""Spatial inconsistency of a teacher's patch tokens (DTM paper, Sec. 3: Table 1 and Fig. 2).

Every patch token is classified on its own; the image's patch-wise ensemble is the argmax of the
mean per-patch softmax. With token morphing, losses.dtm_assignment groups the N tokens into N_m
clusters (k rounds of bipartite matching) and each patch is classified from its cluster's MEAN
token. Printed per head and dose: per-patch accuracy (the share of patches predicting the image's
label: Fig. 2's count) and ensemble top-1, without (N_m = N) and with morphing (N_m = N/2, Table
1), then a sweep over N_m; the test split, or a seeded sample of it (--subset).

    W=runs/fmnist_dtm/teacher_cnn.pth   # from the repository root; teacher=cnn's cached CNN
    python experiments/spatial_inconsistency.py --teacher cnn --weights $W
    python experiments/spatial_inconsistency.py --teacher cnn --weights $W --noise 0,1,2 \
        --swap 0,0.25,0.5 --json spatial.json --figure experiments/figures/spatial_cnn.png
    python experiments/spatial_inconsistency.py --teacher checkpoint --weights run/encoder.pth
    python experiments/spatial_inconsistency.py --teacher clip --model ViT-B-16-quickgelu \
        --weights openai --dataset imagefolder --data-path /data/imagenet --subset 10000

Heads (--heads; default: all of the teacher's):
  fc        cnn: SmallCNN.fc on every patch (classify() is fc of the mean token: at N_m = 1 each
            patch gives the CNN's own prediction)
  zeroshot  clip: logit_scale * cos(token, text embedding of each class name; open_clip's 80
            OpenAI templates; its ImageNet names for a 1000-class set, else the data set's).
            CLIPTeacher's tokens are ln_post(token) @ proj, the space of the pooled embedding
  probe     all: nn.Linear on single patch tokens labelled with their image's class, AdamW on
            --probe-images training images, seeded. Linear: a mean token gets the mean logits
Doses (--noise, --swap; one row per combination): `perturb` makes the teacher's tokens
inconsistent on purpose. The heads are fitted on clean tokens; morphing sees perturbed ones.
"""
import argparse
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import losses as L  # noqa: E402
import model as M  # noqa: E402
from common import ConfigError, run_main  # noqa: E402

HEADS = {"cnn": ("fc", "probe"), "checkpoint": ("probe",), "clip": ("zeroshot", "probe")}
WEIGHTS = {"cnn": "the SmallCNN file pretrain.py caches with teacher=cnn (out_dir/teacher_cnn.pth)",
           "checkpoint": "the encoder.pth that pretrain.py wrote into its run folder"}


def perturb(tokens, noise: float, swap: float, generator: torch.Generator) -> torch.Tensor:
    """A controlled dose of spatial inconsistency: tokens (B, N, C) -> (B, N, C).

    swap: each token, with probability `swap`, becomes the token at the same position of another
    image of the batch, drawn for each position on its own (never the image itself), so that a
    swapped patch points to another image's class, as Fig. 2's wrong patches do; noise: then add
    Gaussian noise of `noise` x the std of the batch's tokens. noise = swap = 0 returns `tokens`
    itself. Otherwise the draws (source images, swap mask, noise) come in that order, so a
    generator in the same state gives the same result, and nested swap masks across swap levels.
    """
    if noise == 0 and swap == 0:
        return tokens
    (B, N), dev = tokens.shape[:2], tokens.device
    if swap > 0 and B < 2:
        raise ValueError("swap needs a batch of at least 2 images")
    shift = torch.randint(1, max(B, 2), (B, N), generator=generator, device=dev)  # (B, N)
    source = (torch.arange(B, device=dev).unsqueeze(1) + shift) % B      # another image, (B, N)
    take = torch.rand((B, N), generator=generator, device=dev) < swap    # (B, N)
    other = tokens[source, torch.arange(N, device=dev)]                  # (B, N, C)
    out = torch.where(take.unsqueeze(-1), other, tokens)
    if noise > 0:
        z = torch.randn(tokens.shape, generator=generator, device=dev, dtype=tokens.dtype)
        out = out + noise * tokens.std() * z
    return out


def morph_tokens(tokens: torch.Tensor, num_morphed: int, iters: int) -> torch.Tensor:
    """Each patch token -> the mean token of its morphed cluster: (B, N, C) -> (B, N, C)."""
    assign = L.dtm_assignment(tokens, num_morphed, iters)                   # (B, N) in [0, N_m)
    sizes = L.cluster_sizes(tokens, assign, num_morphed).unsqueeze(-1)      # (B, N_m, 1)
    means = L.morph_sums(tokens, assign, num_morphed) / sizes               # (B, N_m, C)
    return means.gather(1, assign.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def predictions(logits: torch.Tensor):
    """Per-patch logits (B, N, K) -> per-patch classes (B, N), ensemble classes (B,): the argmax
    of the mean per-patch softmax."""
    return logits.argmax(-1), logits.softmax(-1).mean(1).argmax(-1)


def levels(num_tokens: int) -> list:
    """The N_m of the sweep: N, 3N/4, N/2, N/4, N/8, 1 (floors, duplicates dropped)."""
    n = num_tokens
    return sorted({max(1, m) for m in (n, 3 * n // 4, n // 2, n // 4, n // 8, 1)}, reverse=True)


# -------------------------------------------------------------------------------------------------
# Teachers and heads: a head maps tokens (B, N, C) to per-patch logits (B, N, K)

def load_teacher(args):
    """-> (a model.Teacher giving tokens (B, N, C), its own heads {name: head}, image side)."""
    if args.teacher in WEIGHTS and not os.path.isfile(args.weights or ""):
        raise ConfigError(f"--weights '{args.weights}' is not a file: give {WEIGHTS[args.teacher]}")
    if args.teacher == "cnn":
        cnn = M.load_cnn(args.weights)
        return M.CNNTeacher(cnn, args.img_size or 28), {"fc": cnn.fc}, args.img_size or 28
    if args.teacher == "checkpoint":
        teacher = M.build_teacher("checkpoint", pretrained=args.weights)
        size = teacher.encoder.cfg.img_size
    else:
        try:
            teacher = M.CLIPTeacher(args.model, args.weights or "openai")
        except ValueError as e:                             # an unknown model or tag
            raise ConfigError(f"--model/--weights: {e}") from None
        size = teacher.visual.image_size[0]
    if args.img_size not in (None, size):                   # learned positions: one size only
        raise ConfigError(f"the teacher in --weights takes {size} px images: drop --img-size")
    return teacher, {}, size


def zeroshot_classifier(clip, tokenizer, classnames, templates, device) -> torch.Tensor:
    """(K, C) unit rows: each class's mean normalised text embedding over the templates."""
    import open_clip
    return open_clip.build_zero_shot_classifier(clip, tokenizer, classnames, templates,
                                                device=device, use_tqdm=True).T.float()


def zeroshot_head(classifier: torch.Tensor, logit_scale: float):
    """CLIP's zero-shot logits per token: scale * cos(token, class embedding), (B, N, K)."""
    return lambda tokens: logit_scale * F.normalize(tokens, dim=-1) @ classifier.T


def clip_zeroshot(args, classnames, device):
    import open_clip
    weights = M.resolve_clip_weights(args.model, args.weights or "openai")
    clip = open_clip.create_model(args.model, pretrained=weights, device=device).eval()
    names = open_clip.IMAGENET_CLASSNAMES if len(classnames) == 1000 else classnames
    with torch.no_grad():
        classifier = zeroshot_classifier(clip, open_clip.get_tokenizer(args.model), names,
                                         open_clip.OPENAI_IMAGENET_TEMPLATES, device)
    return zeroshot_head(classifier, clip.logit_scale.exp().item())


def train_probe(teacher, loader, num_classes, epochs, seed, device, max_patches=64) -> nn.Linear:
    """A linear classifier of single patch tokens, each labelled with its image's class: AdamW on
    standardised tokens (at most max_patches seeded ones per image), folded into one nn.Linear
    on the raw tokens."""
    g = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for x, y in tqdm(loader, desc="probe tokens", dynamic_ncols=True):
        t = teacher(x.to(device)).float().cpu()                              # (B, N, C)
        if t.shape[1] > max_patches:
            keep = torch.rand(t.shape[:2], generator=g).argsort(1)[:, :max_patches]
            t = t.gather(1, keep.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        feats.append(t.flatten(0, 1).half())
        labels.append(y.repeat_interleave(t.shape[1]))
    feats, labels = torch.cat(feats), torch.cat(labels)                      # (P, C), (P,)
    mean, std = feats.float().mean(0).to(device), feats.float().std(0).to(device) + 1e-6
    torch.manual_seed(seed)
    head = nn.Linear(feats.shape[1], num_classes).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in tqdm(range(epochs), desc="probe epochs", dynamic_ncols=True):
        for i in torch.randperm(len(labels), generator=g).split(4096):
            z = (feats[i].to(device).float() - mean) / std
            loss = F.cross_entropy(head(z), labels[i].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():  # W ((t - mean) / std) + b = (W / std) t + (b - (W / std) mean)
        head.weight.div_(std)
        head.bias.sub_(head.weight @ mean)
    return head.requires_grad_(False)


# -------------------------------------------------------------------------------------------------
# The measurement

@torch.no_grad()
def evaluate(teacher, heads, loader, doses, sweep, iters, seed, device, keep=0):
    """-> counts {(head, noise, swap, N_m): [correct patches, correct ensembles, images]} and the
    first `keep` images' per-patch classes {same key: (keep, N)} (plus 'images', 'labels')."""
    counts, shown = {}, {}
    for b, (x, y) in enumerate(tqdm(loader, desc="test", dynamic_ncols=True)):
        x, y = x.to(device), y.to(device)
        clean = teacher(x).float()                                            # (B, N, C)
        for noise, swap in doses:
            gen = torch.Generator(device).manual_seed(seed * 1_000_003 + b)   # same for each dose
            tokens = perturb(clean, noise, swap, gen)
            for m in sweep:
                morphed = morph_tokens(tokens, m, iters)                      # (B, N, C)
                for name, head in heads.items():
                    patch, ens = predictions(head(morphed))                   # (B, N), (B,)
                    c = counts.setdefault((name, noise, swap, m), [0, 0, 0])
                    c[0] += int((patch == y[:, None]).sum())
                    c[1] += int((ens == y).sum())
                    c[2] += len(y)
                    if b == 0 and keep:
                        shown[(name, noise, swap, m)] = patch[:keep].cpu()
        if b == 0 and keep:
            shown["images"], shown["labels"] = x[:keep].cpu(), y[:keep].cpu()
    return counts, shown


def batches(n: int, size: int) -> list:
    """Index lists of `size`, the last one merged into the one before if it would hold 1 image
    (a swap needs another image in the batch)."""
    out = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2] += out.pop()
    return out


def sample(ds, n: int, seed: int):
    """A seeded random sample of n images (all for n = 0): an ImageNet folder is sorted by class."""
    pick = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return Subset(ds, pick[:n].tolist()) if 0 < n < len(ds) else ds


def rows_of(counts, num_tokens: int) -> list:
    """counts -> one dict per (head, noise, swap, N_m), in %, grouped by head."""
    heads = list(dict.fromkeys(k[0] for k in counts))
    return [{"head": h, "noise": nz, "swap": sw, "num_morphed": m,
             "patch_top1": 100 * c[0] / (c[2] * num_tokens), "ensemble_top1": 100 * c[1] / c[2]}
            for (h, nz, sw, m), c in sorted(counts.items(), key=lambda kv: heads.index(kv[0][0]))]


def print_tables(rows, num_tokens: int, sweep: list, iters: int):
    by = {(r["head"], r["noise"], r["swap"], r["num_morphed"]): r for r in rows}
    keys = list(dict.fromkeys(k[:3] for k in by))
    half = max(num_tokens // 2, 1)
    print(f"\nwithout (N_m = N = {num_tokens}) vs with morphing (N_m = {half}, k = {iters})")
    print(f"{'head':<9}{'noise':>6}{'swap':>6} | {'per-patch w/o':>13}{'with':>7}{'gain':>7}"
          f" | {'ensemble w/o':>12}{'with':>7}{'gain':>7}")
    for k in keys:
        a, w = by[(*k, num_tokens)], by[(*k, half)]
        cells = [f"{a[s]:>{n}.2f}{w[s]:>7.2f}{w[s] - a[s]:>+7.2f}"
                 for s, n in (("patch_top1", 13), ("ensemble_top1", 12))]
        print(f"{k[0]:<9}{k[1]:>6g}{k[2]:>6g} | {cells[0]} | {cells[1]}")
    for stat, title in (("patch_top1", "per-patch accuracy"), ("ensemble_top1", "ensemble top-1")):
        print(f"\n{title} (%) by N_m (k = {iters}; N_m = {num_tokens} is without morphing)")
        print(f"{'head':<9}{'noise':>6}{'swap':>6} |" + "".join(f"{m:>7}" for m in sweep))
        for k in keys:
            print(f"{k[0]:<9}{k[1]:>6g}{k[2]:>6g} |"
                  + "".join(f"{by[(*k, m)][stat]:>7.2f}" for m in sweep))


def draw_figure(path, shown, head, doses, num_tokens, names):
    """Fig. 2: per row an image, then each dose's per-patch classes without and with morphing
    (N_m = N/2) over it: green = the image's class, red = another (the class id in each patch
    for grids up to 8 x 8)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    pics = data.denormalize(shown["images"]).permute(0, 2, 3, 1)            # (n, H, W, 3)
    n, H, W, _ = pics.shape
    grid, half = int(round(num_tokens ** 0.5)), max(num_tokens // 2, 1)
    ext = (-.5, W - .5, H - .5, -.5)                                        # the image's pixels
    fig, axes = plt.subplots(n, 1 + 2 * len(doses), squeeze=False,
                             figsize=(2.0 * (1 + 2 * len(doses)), 2.2 * n))
    for i, label in enumerate(shown["labels"].tolist()):
        axes[i, 0].imshow(pics[i])
        axes[i, 0].set_title(f"label {label}: {names[label]}", fontsize=8)
        for j, (dose, m) in enumerate(itertools.product(doses, (num_tokens, half))):
            pred = shown[(head, *dose, m)][i].view(grid, grid)
            ok, ax = pred == label, axes[i, 1 + j]
            ax.imshow(pics[i])
            ax.imshow(ok.float(), cmap=ListedColormap(["red", "green"]), vmin=0, vmax=1,
                      alpha=0.45, extent=ext, interpolation="nearest")
            for r, c in itertools.product(range(grid), repeat=2) if grid <= 8 else ():
                ax.text((c + .5) * W / grid - .5, (r + .5) * H / grid - .5, int(pred[r, c]),
                        fontsize=6, ha="center", va="center", color="white")
            kind = "without" if m == num_tokens else f"N_m = {m}"
            ax.set_title(f"{kind}, noise {dose[0]:g} swap {dose[1]:g}\n"
                         f"{int(ok.sum())}/{num_tokens} correct", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"per-patch predictions of head '{head}' without and with token morphing",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    floats = lambda s: [float(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--teacher", required=True, choices=sorted(HEADS))
    p.add_argument("--weights", help="cnn/checkpoint: a file; clip: an open_clip tag or file")
    p.add_argument("--model", default="ViT-B-16-quickgelu", help="clip: the open_clip model")
    p.add_argument("--dataset", default="fashion_mnist", choices=data.DATASETS)
    p.add_argument("--data-path", default="data")
    p.add_argument("--img-size", type=int, help="default: the teacher's (cnn: 28)")
    p.add_argument("--subset", type=int, default=0, help="test images, a seeded sample (0: all)")
    p.add_argument("--heads", type=lambda s: s.split(","), help="default: all of the teacher's")
    p.add_argument("--probe-images", type=int, default=10000)
    p.add_argument("--probe-epochs", type=int, default=3)
    p.add_argument("--iters", type=int, default=1, help="k, the rounds of bipartite matching")
    p.add_argument("--noise", type=floats, default=[0.0])
    p.add_argument("--swap", type=floats, default=[0.0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.add_argument("--figure", help="a .png for Fig. 2 (the first head; the first dose, and each "
                   "of --noise and --swap at its largest alone)")
    p.add_argument("--figure-images", type=int, default=4)
    return p.parse_args(argv)


def main(argv):
    args, start = parse_args(argv), time.time()
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    heads = args.heads or list(HEADS[args.teacher])
    if set(heads) - set(HEADS[args.teacher]):
        raise ConfigError(f"--heads: teacher {args.teacher} has {','.join(HEADS[args.teacher])}")
    if min(args.noise) < 0 or not 0 <= min(args.swap) <= max(args.swap) <= 1 or args.iters < 1:
        raise ConfigError("need --noise >= 0, 0 <= --swap <= 1 and --iters >= 1")
    teacher, own, size = load_teacher(args)
    teacher.to(device)
    test = data.build_dataset(args.dataset, args.data_path, False, data.eval_transform(size))
    names, test = test.classes, sample(test, args.subset, args.seed)
    if "zeroshot" in heads:
        own["zeroshot"] = clip_zeroshot(args, names, device)
    if "probe" in heads:
        train = data.build_dataset(args.dataset, args.data_path, True, data.eval_transform(size))
        train = sample(train, args.probe_images, args.seed)
        own["probe"] = train_probe(teacher, DataLoader(train, args.batch_size), len(names),
                                   args.probe_epochs, args.seed, device)
    num_tokens, doses = teacher.num_patches, list(itertools.product(args.noise, args.swap))
    sweep = levels(num_tokens)
    loader = DataLoader(test, batch_sampler=batches(len(test), args.batch_size))
    keep = args.figure_images if args.figure else 0
    counts, shown = evaluate(teacher, {h: own[h] for h in heads}, loader, doses, sweep,
                             args.iters, args.seed, device, keep)
    rows = rows_of(counts, num_tokens)
    print(f"{len(test)} test images, {num_tokens} tokens; heads: {', '.join(heads)}")
    print_tables(rows, num_tokens, sweep, args.iters)
    if args.figure:
        os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
        last = [(max(args.noise), args.swap[0]), (args.noise[0], max(args.swap))]
        shown_doses = list(dict.fromkeys([doses[0], *last]))   # first; each factor at its max
        draw_figure(args.figure, shown, heads[0], shown_doses, num_tokens, names)
        print(f"figure: {args.figure}")
    seconds = time.time() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "num_tokens": num_tokens, "images": len(test),
                       "seconds": seconds, "rows": rows}, f, indent=1)
    print(f"done in {seconds:.0f} s")


if __name__ == "__main__":
    run_main(main)
