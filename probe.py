"""Frozen-backbone evaluation beyond [cls]: [cls], patch-mean and AbMILP probes, and k-NN.

Paper: "Beyond [cls]: Exploring the true potential of Masked Image Modeling representations",
Przewięźlikowski, Balestriero, Jasiński, Śmieja, Zieliński, arXiv:2412.03215.
Choices: DECISIONS.md, section 8.

    python probe.py --config configs/fmnist_probe.yaml   # configs/fmnist_dtm.yaml's encoder, CPU
    # MAE's ViT-B/16 weights from a local file, MAE's ImageNet protocol, one node with 8 GPUs
    torchrun --nproc_per_node=8 probe.py backbone=mae_pretrain_vit_base.pth backbone_format=timm \
        model=vit_base patch_size=16 img_size=224 dataset=imagefolder data_path=/data/imagenet

MIM models keep their knowledge in the patch tokens: a probe that pools them selectively (AbMILP)
beats a linear probe on [cls]. Every head is pool -> BatchNorm1d(D, affine=False) -> Linear(D, C)
(losses.ProbeHead) on block `block`'s output, before the final LayerNorm (the authors) or after
it (final_norm=true); all heads train together in one pass. Head `cls_norm` is MAE's linear
probe, [cls] after the final LayerNorm. k-NN is DINO's, after subtracting the bank's mean
feature. baselines=true adds a random-init encoder and the raw pixels: the numbers to beat.
Features that fit in cache_max_gb are extracted once ("path: cached"), else the backbone runs at
every step on MAE's crops ("path: streaming"). out_dir: log.jsonl, checkpoint.pth, heads.pth and
results.json (accuracies and protocol).
"""
import argparse
import copy
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import List, NamedTuple

import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader, DistributedSampler, Subset

import data
import losses
import model
from model import VIT_SIZES  # (inside Config, `model` is the field)
from common import (GT0, ConfigError, Run, cosine_schedule, ddp, all_reduce_mean,
                    all_reduce_sum, config_dict, load_optimizer, load_state,
                    log_json, no_sync, parse_config, print0, read_weights, run_main,
                    setup_distributed, first_line, train_loader)


@dataclass
class Config:
    # backbone (frozen: eval mode, no grad)
    backbone: str = "runs/fmnist_dtm/encoder.pth"  # pretrain.py's encoder.pth, or timm/MAE weights
    backbone_format: str = "project"   # project (model.load_encoder) | timm (timm ViT or MAE ckpt)
    model: str = "vit_base"            # timm format only: the architecture (+ the next three keys)
    patch_size: int = 16               # timm format only
    layer_scale: float = 0.0           # timm format only: > 0 if the weights have ls1/ls2 gammas
    img_size: int = 0                  # timm format only: the input side (0 = 224)
    block: int = -1                    # features = block's output (0-based, -1 = last): the authors
    final_norm: bool = False           # also apply the backbone's final LayerNorm (the authors: no)
    # data
    dataset: str = "fashion_mnist"     # fashion_mnist | imagefolder | cifar10 | cifar100
    data_path: str = "data"            # imagefolder: root with train/ and val/; else download dir
    subset: int = 0                    # use `subset` training images, evenly spaced (0 = all)
    val_subset: int = 0                # use `val_subset` validation images, evenly spaced (0 = all)
    num_workers: int = 2               # loader processes per process
    # heads, each pool -> BN -> Linear: cls | cls_norm ([cls] after the final norm) | mean | abmilp
    heads: List[str] = field(default_factory=lambda: ["cls", "cls_norm", "mean", "abmilp"])
    knn: List[str] = field(default_factory=lambda: ["cls", "mean"])  # k-NN: cls | mean ([] = off)
    knn_k: int = 20                    # DINO: k = 20
    knn_temperature: float = 0.07      # DINO: votes weighted by exp(cos / 0.07)
    knn_centre: bool = True            # subtract the bank's mean feature first (as pretrain.py)
    baselines: bool = False            # also a random-init encoder and raw pixels (cached path)
    # optimisation (MAE's linear probe: LARS, blr 0.1, no weight decay, 10 + 80 epochs)
    optimizer: str = "lars"            # lars | sgd (both momentum 0.9)
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 16384            # global batch over all processes and accumulation steps
    accum_steps: int = 1               # gradient accumulation micro-steps per optimizer step
    blr: float = 0.1                   # lr = blr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.0          # MAE linprobe: none
    cache: str = "auto"                # auto | always | never: heads train on tokens extracted once
    cache_max_gb: float = 4.0          # auto: cache when the train + val tokens take at most this
    # run
    out_dir: str = "runs/probe"
    eval_every: int = 10               # epochs between evaluations (and always after the last)
    log_every: int = 50                # optimizer steps between log lines (and SIGTERM checks)
    dist_timeout_s: int = 600          # after start-up: a collective waiting longer fails the run
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda

    CHOICES = {"backbone_format": ("project", "timm"), "model": VIT_SIZES,
               "dataset": data.DATASETS, "heads": (*losses.POOLS, "cls_norm"),
               "knn": ("cls", "mean"),  # k-NN needs no training, so no AbMILP
               "optimizer": ("lars", "sgd"), "cache": ("auto", "always", "never"),
               "device": ("auto", "cpu", "cuda")}
    LIMITS = {"knn_temperature": GT0}

    def validate(self):
        if not self.heads and not self.knn:
            raise ConfigError("nothing to evaluate: give at least one of 'heads' or 'knn'")


# -----------------------------------------------------------------------------
# The frozen backbone, and the baselines' feature sources

def load_backbone(cfg: Config) -> model.ViT:
    """The frozen encoder: an encoder.pth of this project, or timm / MAE weights."""
    if cfg.backbone_format == "timm":
        vit = model.build_vit(cfg.model, img_size=cfg.img_size or 224, patch_size=cfg.patch_size,
                              layer_scale=cfg.layer_scale)
        if cfg.backbone.endswith(".safetensors"):
            from safetensors.torch import load_file
            raw = load_file(cfg.backbone)
        else:  # MAE's training checkpoints also hold their argparse.Namespace
            raw = read_weights(cfg.backbone, "backbone", safe_globals=[argparse.Namespace])
        # dropped: a classifier head, fc_norm (from_timm), MAE's decoder and its mask token
        weights = {k: v for k, v in model.from_timm(raw).items() if not k.startswith("head.")}
        weights["mask_token"] = vit.state_dict()["mask_token"]  # a probe never masks
        load_state(vit, weights, cfg.backbone)
    else:
        read_weights(cfg.backbone, "backbone")  # missing, unreadable, a checkpoint.pth: one line
        try:
            vit = model.load_encoder(cfg.backbone)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ConfigError(f"backbone '{cfg.backbone}': {first_line(e)}; for timm or MAE "
                              "weights set backbone_format=timm") from None
    depth = len(vit.blocks)
    if not -depth <= cfg.block < depth:
        raise ConfigError(f"config key 'block' must be in [-{depth}, {depth - 1}] for this "
                          f"{depth}-block backbone, got {cfg.block}")
    return vit.eval().requires_grad_(False)


@torch.no_grad()
def frozen_tokens(vit: model.ViT, images: torch.Tensor, block: int = -1,
                  final_norm: bool = False) -> torch.Tensor:
    """Images (B, C, H, W) -> fp32 tokens (B, 1+N, D), [cls] first: block `block`'s output (no
    block after it runs), before the final LayerNorm unless final_norm. bf16 on CUDA."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
        depth = block % len(vit.blocks) + 1
        tokens, layers = vit.forward_intermediates(images, depth=depth, collect=False)
        return (tokens if final_norm else layers.pre_norm).float()


def feature_sources(cfg: Config, vit: model.ViT) -> dict:
    """{source: encoder}: the backbone; baselines: + a random-init one (seed), the pixels (None)."""
    if not cfg.baselines:
        return {"encoder": vit}
    torch.manual_seed(cfg.seed)
    random_vit = model.ViT(vit.cfg).to(vit.cls_token.device)
    return {"encoder": vit, "random": random_vit.eval().requires_grad_(False), "pixels": None}


def features(sources: dict, images: torch.Tensor, cfg: Config) -> dict:
    """{source: (B, T, D')}: each encoder's frozen tokens; the pixels (None) as one token of
    C*H*W values, so a head reading [cls] (BN -> Linear) is the linear probe on the pixels."""
    return {name: images.flatten(1).unsqueeze(1).float() if enc is None
            else frozen_tokens(enc, images, cfg.block, cfg.final_norm)
            for name, enc in sources.items()}


def source_of(row: str) -> str:
    """A result row's feature source: 'random_mean' -> 'random', 'pixels_knn' -> 'pixels'."""
    prefix = row.split("_")[0]
    return prefix if prefix in ("random", "pixels") else "encoder"


# -----------------------------------------------------------------------------
# Frozen features of each rank's shard: extracted once (cached) or on every pass (streaming)

def num_classes_of(ds) -> int:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return len(ds.classes)


class Shard(NamedTuple):
    """One rank's share of a data set as frozen features; valid is False at a sampler's pad."""
    feats: dict                        # {name: (M, ...)}
    labels: torch.Tensor               # (M,)
    valid: torch.Tensor                # (M,) bool

    @classmethod
    def cat(cls, batches) -> "Shard":
        feats, labels, valid = zip(*batches)
        return cls({s: torch.cat([f[s] for f in feats]) for s in feats[0]}, torch.cat(labels),
                   torch.cat(valid))

    def batches(self, size: int):
        for i in range(0, len(self.labels), size):
            yield ({s: f[i: i + size] for s, f in self.feats.items()}, self.labels[i: i + size],
                   self.valid[i: i + size])

    def shuffled(self, size: int, generator: torch.Generator, skip: int = 0):
        """(feats, labels) batches in a random order, after the first `skip`; whole batches only,
        so every rank takes the same number of steps."""
        order = torch.randperm(len(self.labels), generator=generator).to(self.labels.device)
        whole = order[: len(order) // size * size].split(size)[skip:]
        return (({s: f[i] for s, f in self.feats.items()}, self.labels[i]) for i in whole)


class Frozen:
    """This rank's shard of a data set (eval transform), in order: batches() gives ({source:
    (B, T, D')}, (B,) labels, (B,) valid) from the cache or from the sources at every pass."""

    def __init__(self, ds, sources: dict, cfg: Config, dist, batch: int, cached: bool):
        sampler = DistributedSampler(ds, dist.world, dist.rank, shuffle=False)
        self.loader = DataLoader(ds, batch, sampler=sampler, num_workers=cfg.num_workers,
                                 pin_memory=dist.device.type == "cuda")
        # rank r holds images r, r + W, r + 2W, ... and, past the end, the sampler's pads
        self.valid = (dist.rank + torch.arange(len(sampler)) * dist.world < len(ds)).to(dist.device)
        self.sources, self.cfg, self.device, self.batch = sources, cfg, dist.device, batch
        self.cache = None  # until it is filled, batches() runs the sources
        self.cache = Shard.cat(self.batches()) if cached else None

    def batches(self):
        if self.cache is not None:
            return self.cache.batches(self.batch)
        b, dev = self.batch, self.device
        return ((features(self.sources, x.to(dev, non_blocking=True), self.cfg), y.to(dev),
                 self.valid[i * b: i * b + len(y)]) for i, (x, y) in enumerate(self.loader))


def knn_keep(feats: dict, cfg: Config) -> dict:
    """{source: (B, 1+N, D)} -> {row: (B, D)}: what each k-NN row compares."""
    rows = {"encoder": "knn_{}", "random": "random_knn_{}", "pixels": "pixels_knn"}
    return {rows[s].format(p): losses.pool_tokens(t, p)
            for s, t in feats.items() for p in (["cls"] if s == "pixels" else cfg.knn)}


def gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's t (equal lengths: the shards are padded) concatenated, on every rank."""
    if not tdist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


# -----------------------------------------------------------------------------
# Heads, optimizer, evaluation

class Heads(torch.nn.ModuleDict):
    """{row: head}, trained together; each row reads its source's features (source_of)."""

    def forward(self, feats: dict) -> dict:
        return {row: head(feats[source_of(row)]) for row, head in self.items()}


def build_heads(cfg: Config, vit: model.ViT, num_classes: int, sources: dict = None) -> Heads:
    """cfg.heads on every encoder of `sources`; on the pixels one linear probe ('pixels_linear')."""
    heads, D = Heads(), vit.cfg.embed_dim
    for source, enc in (sources or feature_sources(cfg, vit)).items():
        torch.manual_seed(cfg.seed)  # every source's heads start alike: only the features differ
        if enc is None and cfg.heads:
            pixels = vit.cfg.in_chans * vit.cfg.img_size ** 2
            heads["pixels_linear"] = losses.ProbeHead("cls", pixels, num_classes)
        for name in cfg.heads if enc is not None else []:
            head = losses.ProbeHead(name.removesuffix("_norm"), D, num_classes)
            if name == "cls_norm":  # MAE's linear probe: [cls] after a frozen copy of the norm
                norm = torch.nn.Identity() if cfg.final_norm else enc.norm  # never applied twice
                head = torch.nn.Sequential(OrderedDict(
                    norm=copy.deepcopy(norm).requires_grad_(False), probe=head))
            heads[name if source == "encoder" else f"{source}_{name}"] = head
    return heads


HEAD_KEYS = ("heads", "block", "final_norm", "baselines")


def load_heads(path: str, cfg: Config, vit: model.ViT, num_classes: int) -> Heads:
    """Heads saved by probe.py (heads.pth), checked to fit the features and head settings."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    old = {k: saved["config"].get(k, getattr(Config, k, None)) for k in HEAD_KEYS}  # older files
    diff = {k: v for k, v in old.items() if v != getattr(cfg, k)}
    if diff:
        raise ConfigError(f"the heads in '{path}' were trained with {diff}: use the same settings")
    heads = build_heads(cfg, vit, num_classes)
    heads.load_state_dict(saved["heads"], strict=True)
    return heads


# the settings that shape the heads or their features: a resume must keep them
RESUME_KEYS = ("backbone", "backbone_format", "model", "patch_size", "layer_scale", "img_size",
               "dataset", "subset", *HEAD_KEYS)


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in MAE's linear probe: SGD with momentum where the update of each
    weight matrix is scaled by trust_coefficient * ||w|| / ||g||; 1-d parameters are plain SGD."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in (p for p in g["params"] if p.grad is not None):
                d = p.grad
                if p.ndim > 1:  # no decay, no trust ratio for biases
                    d = d.add(p, alpha=g["weight_decay"])
                    w, n = p.norm(), d.norm()
                    d = d.mul(torch.where((w > 0) & (n > 0), g["trust_coefficient"] * w / n, 1.0))
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                p.add_(mu.mul_(g["momentum"]).add_(d), alpha=-g["lr"])


@torch.no_grad()
def evaluate(heads: Heads, batches) -> dict:
    """{head: (correct top-1, correct top-5, images)} over the real images of every rank's shard."""
    heads.eval()
    counts = torch.zeros(len(heads), 3, dtype=torch.long, device=next(heads.parameters()).device)
    for feats, labels, valid in batches:
        for i, logits in enumerate(heads(feats).values()):
            top1, top5 = losses.topk_correct(logits, labels)
            counts[i] += torch.stack([top1[valid].sum(), top5[valid].sum(), valid.sum()])
    counts = all_reduce_sum(counts)
    return {name: tuple(counts[i].tolist()) for i, name in enumerate(heads)}


def knn_evaluate(bank: Shard, val: Shard, num_classes: int, cfg: Config) -> dict:
    """{row: (correct top-1, correct top-5, images)} of k-NN votes (knn_centre), summed over ranks:
    this rank's val images against the whole (gathered, de-padded) bank."""
    real = gather(bank.valid.to(torch.uint8)).bool()  # (world * M,)
    labels, valid, counts = gather(bank.labels)[real], val.valid, {}
    for row, f in bank.feats.items():
        votes = losses.knn_votes(gather(f)[real], labels, val.feats[row], num_classes, cfg.knn_k,
                                 cfg.knn_temperature, centre=cfg.knn_centre)
        top1, top5 = losses.topk_correct(votes.log(), val.labels)  # log: no vote = -inf: no guess
        hits = torch.stack([top1[valid].sum(), top5[valid].sum(), valid.sum()])
        counts[row] = tuple(all_reduce_sum(hits).tolist())
    return counts


def results_table(counts: dict) -> dict:
    return {name: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "correct_top1": c1,
                   "correct_top5": c5, "images": n} for name, (c1, c5, n) in counts.items()}


READS = {"cls": "[cls] token", "mean": "mean of the patch tokens",
         "abmilp": "AbMILP over the patch tokens",
         "cls_norm": "[cls] after the final LayerNorm (MAE's linear probe)",
         "knn_cls": "k-NN on the [cls] token", "knn_mean": "k-NN on the patch mean",
         "pixels_linear": "BASELINE raw pixels: linear probe (BN -> Linear) on the image",
         "pixels_knn": "BASELINE raw pixels: k-NN on the image"}  # what each result row reads
READS.update({f"random_{row}": f"BASELINE random-init encoder: {text}"
              for row, text in READS.items() if source_of(row) == "encoder"})


# -----------------------------------------------------------------------------
# The probe: the frozen features, every head on them with one backward for all, the evaluation

def build_features(cfg: Config, dist, vit: model.ViT, batch: int, train: bool) -> tuple:
    """-> ({source: encoder}, (train, val) as Frozen, the loader of MAE's linear-probe views or
    None: the cached path, or not training)."""
    sources = feature_sources(cfg, vit)  # {encoder (+ random init, pixels)}
    tf = data.eval_transform(vit.cfg.img_size)
    train_ds, val_ds = (data.build_dataset(cfg.dataset, cfg.data_path, train=t, transform=tf,
                                           subset=cfg.subset if t else cfg.val_subset)
                        for t in (True, False))
    images = len(train_ds) + len(val_ds)
    per_image = sum((1 + vit.num_patches) * vit.cfg.embed_dim if enc is not None
                    else vit.cfg.in_chans * vit.cfg.img_size ** 2 for enc in sources.values())
    cache_gb = images * per_image * 4 / 1e9  # fp32
    cached = cfg.cache == "always" or (cfg.cache == "auto" and cache_gb <= cfg.cache_max_gb)
    if cfg.baselines and not cached:
        raise ConfigError(f"baselines=true needs the cached path, but the features would take "
                          f"{cache_gb:.1f} GB (cache={cfg.cache}, cache_max_gb={cfg.cache_max_gb})"
                          ": raise cache_max_gb, lower subset, or set baselines=false")
    print0(f"backbone {cfg.backbone}: block {cfg.block % len(vit.blocks)} of {len(vit.blocks)}, "
           f"{'after' if cfg.final_norm else 'before'} the final norm; {len(train_ds)} training, "
           f"{len(val_ds)} validation images; path: {'cached' if cached else 'streaming'} "
           f"(the tokens: {cache_gb:.2f} GB, cache_max_gb={cfg.cache_max_gb})")
    sets = (Frozen(train_ds, sources, cfg, dist, batch, cached and train),  # else: k-NN streams
            Frozen(val_ds, sources, cfg, dist, batch, cached))
    if cached or not train:
        return sources, sets, None
    # RandomResizedCrop + flip, no colour jitter, as uint8 (normalised on the device); drawn from
    # (seed, epoch, index), so a resumed epoch gets the same views
    views = data.pretrain_transform(vit.cfg.img_size, 0.08, color_jitter=0.0)
    ds = data.build_dataset(cfg.dataset, cfg.data_path, train=True, transform=views,
                            subset=cfg.subset)
    loader = train_loader(data.SeededImages(ds, cfg.seed), batch, dist, cfg.seed, cfg.num_workers)
    return sources, sets, loader


def train_batches(cfg: Config, run: Run, epoch: int, sources: dict, cache: Shard, loader):
    """This epoch's ({source: (B, T, D')}, (B,) labels) from where a resumed epoch left off."""
    dev = run.dist.device
    if loader is not None:
        return ((features(sources, data.normalize(x.to(dev, non_blocking=True)), cfg),
                 y.to(dev, non_blocking=True)) for x, y in run.epoch_batches(epoch, loader))
    # the cache in an order set by (seed, epoch, rank)
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + run.dist.rank)
    return cache.shuffled(run.micro_batch, gen, skip=run.seen(epoch))


def write_results(cfg: Config, vit: model.ViT, heads, sets: tuple, lr: float, dist):
    """Heads and k-NN on the val set -> the table on stdout, and results.json with the protocol
    to read the numbers by (DECISIONS.md, section 8)."""
    train, val = (s.loader.dataset for s in sets)
    counts = evaluate(heads, sets[1].batches()) if cfg.heads else {}
    if cfg.knn:
        bank, queries = (Shard.cat((knn_keep(f, cfg), y, v) for f, y, v in s.batches())
                         for s in sets)
        counts.update(knn_evaluate(bank, queries, num_classes_of(val), cfg))
    order = ("encoder", "random", "pixels")  # the encoder's rows, then each baseline's
    table = results_table(dict(sorted(counts.items(), key=lambda c: order.index(source_of(c[0])))))
    print0(f"\n{'head':<16} {'top-1':>7} {'top-5':>7} {'images':>7}  reads")
    for name, r in table.items():
        print0(f"{name:<16} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['images']:>7d}  {READS[name]}")
    depth, block, cached = len(vit.blocks), cfg.block % len(vit.blocks), sets[1].cache is not None
    crops = "RandomResizedCrop(scale=(0.08, 1)) + horizontal flip"  # MAE's linear probe
    baselines = {"random": f"random init (seed {cfg.seed}) of the backbone's architecture",
                 "pixels": "the eval-transformed image, flattened (C*H*W), as one token"}
    protocol = {"architecture": asdict(vit.cfg), "block": block, "final_norm": cfg.final_norm,
                "features": f"output of block {block} (0-based) of {depth}, "
                            f"{'after' if cfg.final_norm else 'before'} the final LayerNorm",
                "backbone_mode": "eval() (no dropout, no drop path), requires_grad=False, "
                                 "torch.no_grad; bf16 on CUDA",
                "path": "cached" if cached else "streaming",
                "baselines": baselines if cfg.baselines else "off",
                "train_augmentation": "none (tokens extracted once)" if cached else crops,
                "lr": lr, "reported": "after the last epoch (no selection on the validation set)",
                "train_images": len(train), "val_images": len(val), "world_size": dist.world,
                "num_classes": num_classes_of(val), "tokens": {row: READS[row] for row in table}}
    if dist.main:
        with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
            json.dump({"accuracy": {n: r["top1"] for n, r in table.items()}, "results": table,
                       "protocol": protocol, "config": config_dict(cfg)}, f, indent=2)
    print0(f"done: {cfg.out_dir}/results.json")


def main(argv):
    cfg = parse_config(Config, argv)
    dist = setup_distributed(cfg.device, cfg.dist_timeout_s)
    train = bool(cfg.heads)  # else: k-NN only
    run = Run(cfg, dist, RESUME_KEYS if train else None)  # config checked
    vit = load_backbone(cfg).to(dist.device)
    sources, sets, loader = build_features(cfg, dist, vit, run.micro_batch, train)
    lr = cfg.blr * cfg.batch_size / 256  # MAE: lr = blr * batch / 256
    heads = None
    if train:
        heads = build_heads(cfg, vit, num_classes_of(sets[1].loader.dataset), sources)
        heads.to(dist.device)
        params = [p for p in heads.parameters() if p.requires_grad]
        optim = LARS if cfg.optimizer == "lars" else torch.optim.SGD
        optimizer = optim(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
        print0(f"heads {list(heads)}: {sum(p.numel() for p in params) / 1e3:.1f}k parameters; "
               f"{cfg.optimizer}, lr {lr:.4g}")
        net = ddp(heads, dist)
        heads_file = lambda: {run.path("heads.pth"): {"heads": heads.state_dict(),  # noqa: E731
                                                      "config": config_dict(cfg)}}

        def load(ckpt):
            load_state(heads, ckpt["heads"], run.ckpt_path)
            load_optimizer(optimizer, ckpt["optimizer"], run.ckpt_path)
        micro_batches = len(loader) if loader else len(sets[0].cache.labels) // run.micro_batch
        steps_per_epoch = micro_batches // cfg.accum_steps
        run.resume(steps_per_epoch, load,
                   lambda: {"heads": heads.state_dict(), "optimizer": optimizer.state_dict()})
        lr_at = cosine_schedule(cfg, lr, steps_per_epoch)  # MAE's linear probe schedule

    for epoch in run.epochs() if train else ():
        batches = train_batches(cfg, run, epoch, sources, sets[0].cache, loader)
        heads.train()
        for step in run.steps(epoch):  # a progress bar; log, stop signal: `run`
            run.set_lr(optimizer, lr_at[step])
            for micro in range(cfg.accum_steps):
                feats, labels = next(batches)                 # {source: (B, T, D')}, (B,)
                with no_sync(net, micro, cfg.accum_steps):
                    loss, each = losses.probe_loss(net(feats), labels)  # sum over the heads
                    (loss / cfg.accum_steps).backward()
                run.add({f"loss_{name}": value for name, value in each.items()})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        run.end_epoch(epoch)  # stopped by a signal mid-epoch: save and exit
        for name, buf in heads.named_buffers():  # BN statistics: each rank's own, averaged, so
            if "running_" in name:               # every rank evaluates and saves the same heads
                buf.copy_(all_reduce_mean(buf))
        done = epoch + 1
        if done % cfg.eval_every == 0 and done < cfg.epochs:  # the last: write_results
            acc = results_table(evaluate(heads, sets[1].batches()))
            print0(f"epoch {done}: " + ", ".join(f"{n} {r['top1']:.2f}" for n, r in acc.items()))
            if dist.main:
                log_json(run.log_path, {"epoch": done, **{f"val_top1_{n}": r["top1"]
                                                          for n, r in acc.items()}})
        run.save(done, heads_file() if done == cfg.epochs else {})
        run.exit_if_stopped(done)

    write_results(cfg, vit, heads, sets, lr, dist)


if __name__ == "__main__":
    run_main(main)
