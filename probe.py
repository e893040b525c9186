"""Frozen-backbone evaluation beyond [cls]: [cls], patch-mean and AbMILP probes, and k-NN.

Paper: "Beyond [cls]: Exploring the true potential of Masked Image Modeling representations",
Przewięźlikowski, Balestriero, Jasiński, Śmieja, Zieliński, arXiv:2412.03215.
Choices: DECISIONS.md.

    # the default: the Fashion-MNIST encoder of
    # `pretrain.py --config configs/fmnist_dtm.yaml`, on the CPU in minutes
    python probe.py --config configs/fmnist_probe.yaml
    # MAE's ViT-B/16 weights from a local file, MAE's ImageNet protocol, one node with 8 GPUs
    torchrun --nproc_per_node=8 probe.py backbone=mae_pretrain_vit_base.pth backbone_format=timm \
        model=vit_base patch_size=16 img_size=224 dataset=imagefolder data_path=/data/imagenet
    # only evaluate heads trained before (k-NN is always recomputed)
    python probe.py --config configs/fmnist_probe.yaml eval_only=true

MIM models keep their knowledge in the patch tokens (Beyond [cls]): a probe that aggregates the
frozen patch tokens selectively (AbMILP) beats a linear probe on [cls]. Every head is
pool -> BatchNorm1d(D, affine=False) -> Linear(D, C) on the same frozen tokens (losses.ProbeHead);
all heads train together in one pass over the data. Features are the output of block `block`
before the final LayerNorm (the authors' choice), or after it with final_norm=true; the head
`cls_norm` reads [cls] after the final LayerNorm (MAE's linear probe, where ViT-B scores 67.8).
k-NN is DINO's (k = 20, cosine, votes exp(cos / 0.07)) after subtracting the bank's mean
feature, as in pretrain.py. With baselines=true the same heads and k-NN also run, on the same
split and batches, on a random-init encoder of the backbone's architecture and on raw pixels:
every table has the two numbers a pre-trained encoder must beat.

Two paths, the log says which one ran:
  cached    - the frozen tokens of the train and val sets are extracted once (eval transform) and
              the heads train on the cache: minutes for small data sets, but no augmentation;
  streaming - the backbone runs every step on RandomResizedCrop + flip views (MAE's protocol).
The run directory gets log.jsonl, checkpoint.pth (resumed automatically), heads.pth (the trained
heads, for eval_only and experiments/attention_analysis.py) and results.json (head -> accuracy,
with every protocol choice).
"""
import argparse
import copy
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2 as T

import data
import losses
import model as M
from common import (GE1, GT0, ConfigError, Run, cosine_schedule, ddp, all_reduce_mean,
                    all_reduce_sum, check_corrupt, config_dict, first_line, load_optimizer,
                    load_state, log_json, no_sync, parse_config, print0, read_weights, run_main,
                    setup_distributed, train_loader)


HEADS = (*losses.POOLS, "cls_norm")


@dataclass
class Config:
    # backbone (frozen, eval mode, no grad)
    # encoder.pth of pretrain.py, or a timm / MAE weights file
    backbone: str = "runs/fmnist_dtm/encoder.pth"
    backbone_format: str = "project"   # project (model.load_encoder) | timm (timm ViT or MAE ckpt)
    # timm format only: the architecture, with patch_size, img_size, layer_scale
    model: str = "vit_base"
    patch_size: int = 16               # timm format only
    layer_scale: float = 0.0           # timm format only: > 0 if the weights have ls1/ls2 gammas
    img_size: int = 0                  # input side; 0 = the encoder's own (project) or 224 (timm)
    block: int = -1                    # features = block's output (0-based, -1 = last): the authors
    final_norm: bool = False           # also apply the backbone's final LayerNorm (the authors: no)
    # data
    dataset: str = "fashion_mnist"     # fashion_mnist | imagefolder | cifar10 | cifar100
    data_path: str = "data"            # imagefolder: root with train/ and val/; else download dir
    subset: int = 0                    # use `subset` training images, evenly spaced (0 = all)
    val_subset: int = 0                # use `val_subset` validation images, evenly spaced (0 = all)
    crop_scale_min: float = 0.08       # streaming: RandomResizedCrop's lowest scale (MAE linprobe)
    num_workers: int = 2               # loader processes per process
    # heads: pool -> BatchNorm1d(affine=False) -> Linear
    # cls | cls_norm ([cls] after the final norm: MAE's linear probe) | mean | abmilp
    heads: List[str] = field(default_factory=lambda: ["cls", "cls_norm", "mean", "abmilp"])
    abmilp_depth: int = 1              # scorer layers: 1 = w^T x + b (the headline setting)
    abmilp_activation: str = "tanh"    # tanh | relu | gelu between scorer layers (depth > 1)
    # none | map (score a 1-head self-attention's output) | both (and pool it)
    abmilp_self_attn: str = "none"
    abmilp_pos_embed: bool = False     # add the fixed sin-cos position table to the scorer input
    # features for k-NN: cls | mean ([] = off)
    knn: List[str] = field(default_factory=lambda: ["cls", "mean"])
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
    # path
    # auto | always | never: train the heads on frozen tokens extracted once
    cache: str = "auto"
    cache_max_gb: float = 4.0          # auto: cache when the train + val tokens take at most this
    # run
    out_dir: str = "runs/probe"
    eval_only: bool = False            # no training: load heads_path and evaluate
    heads_path: str = ""               # eval_only: trained heads ('' = out_dir/heads.pth)
    eval_every: int = 10               # epochs between evaluations (and always after the last)
    log_every: int = 50                # optimizer steps between log lines (and SIGTERM checks)
    max_corrupt_frac: float = 0.01     # imagefolder: skip corrupt images; more than this: stop
    dist_timeout_s: int = 600          # after start-up: a collective waiting longer fails the run
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda

    CHOICES = {"backbone_format": ("project", "timm"), "model": M.VIT_SIZES,
               "dataset": data.DATASETS, "heads": HEADS,
               "knn": ("cls", "mean"),  # k-NN needs no training, so no AbMILP
               "abmilp_activation": sorted(losses.ACTIVATIONS),
               "abmilp_self_attn": losses.SELF_ATTN, "optimizer": ("lars", "sgd"),
               "cache": ("auto", "always", "never"), "device": ("auto", "cpu", "cuda")}
    LIMITS = {"abmilp_depth": GE1, "knn_temperature": GT0}

    def validate(self):
        if len(set(self.heads)) < len(self.heads) or len(set(self.knn)) < len(self.knn):
            raise ConfigError(f"config keys 'heads' and 'knn' must not repeat a name, got "
                              f"{self.heads}, {self.knn}")
        if not self.heads and not self.knn:
            raise ConfigError("nothing to evaluate: give at least one of 'heads' or 'knn'")




# -----------------------------------------------------------------------------
# The frozen backbone, and the baselines' feature sources

def load_backbone(cfg: Config) -> M.ViT:
    """The ViT named by cfg.backbone, strictly loaded, in eval mode with requires_grad off."""
    if not os.path.isfile(cfg.backbone):
        raise FileNotFoundError(f"backbone file '{cfg.backbone}' does not exist: give the "
                                "encoder.pth that pretrain.py wrote, or a timm / MAE weights file "
                                "with backbone_format=timm")
    if cfg.backbone_format == "project":
        read_weights(cfg.backbone, "backbone")  # unreadable, unsafe or a checkpoint.pth: one line
        try:
            vit = M.load_encoder(cfg.backbone)
        except (ValueError, TypeError, RuntimeError) as e:
            raise ConfigError(f"backbone '{cfg.backbone}': {first_line(e)}; for timm or MAE "
                              "weights set backbone_format=timm") from None
        if cfg.img_size and cfg.img_size != vit.cfg.img_size:
            raise ConfigError(f"img_size={cfg.img_size} but the encoder was trained at "
                              f"{vit.cfg.img_size} and position embeddings are not resized here: "
                              "set img_size=0")
    else:
        vit = M.build_vit(cfg.model, img_size=cfg.img_size or 224, patch_size=cfg.patch_size,
                          layer_scale=cfg.layer_scale)
        load_timm_weights(vit, cfg.backbone)
    return vit.eval().requires_grad_(False)


def load_timm_weights(vit: M.ViT, path: str):
    """timm ViT or MAE checkpoint -> vit. Every key and shape must match; dropped explicitly are
    only what a probe never uses: MAE's decoder and its mask token, fc_norm (model.from_timm), a
    head."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        raw = load_file(path)
    else:  # MAE's training checkpoints also hold their argparse.Namespace
        raw = read_weights(path, "backbone", safe_globals=[argparse.Namespace])
    sd = {k: v for k, v in M.from_timm(raw).items() if not k.startswith("head.")}
    own = vit.state_dict()
    if "mask_token" not in sd or sd["mask_token"].shape != own["mask_token"].shape:
        sd["mask_token"] = own["mask_token"]  # MAE's is its decoder's; a probe never masks
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    wrong = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        c = vit.cfg
        raise ConfigError(f"'{path}' does not fit model={c.depth}x{c.embed_dim}d "
                          f"img_size={c.img_size} patch_size={c.patch_size} "
                          f"layer_scale={c.layer_scale}: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, wrong shape {wrong[:3]}; set the checkpoint's "
                          "architecture")
    vit.load_state_dict(sd, strict=True)


def frozen_tokens(vit: M.ViT, images: torch.Tensor, block: int = -1,
                  final_norm: bool = False) -> torch.Tensor:
    """Images (B, C, H, W) -> tokens (B, 1+N, D), [cls] first: the output of block `block`,
    before the final LayerNorm unless final_norm. Blocks after `block` are not run."""
    depth = block % len(vit.blocks) + 1
    tokens, layers = vit.forward_intermediates(images, depth=depth, collect=False)
    return tokens if final_norm else layers.pre_norm


@torch.no_grad()
def backbone_tokens(vit: M.ViT, images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """frozen_tokens without grad, in bf16 on CUDA; fp32 out. (B, C, H, W) -> (B, 1+N, D)."""
    assert not vit.training, "the backbone must stay in eval mode"
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
        return frozen_tokens(vit, images, cfg.block, cfg.final_norm).float()


def feature_sources(cfg: Config, vit: M.ViT) -> dict:
    """{source: encoder}: the backbone; with baselines also a random-init encoder of the same
    architecture (seed cfg.seed) and the raw pixels (None)."""
    if not cfg.baselines:
        return {"encoder": vit}
    torch.manual_seed(cfg.seed)
    random_vit = M.ViT(vit.cfg).to(vit.cls_token.device)
    return {"encoder": vit, "random": random_vit.eval().requires_grad_(False), "pixels": None}


@torch.no_grad()
def features(sources: dict, images: torch.Tensor, cfg: Config) -> dict:
    """{source: (B, T, D')}: each encoder's frozen tokens; the pixels (None) as one token of
    C*H*W values, so a head reading [cls] (BN -> Linear) is the linear probe on the pixels."""
    return {name: images.flatten(1).unsqueeze(1).float() if enc is None
            else backbone_tokens(enc, images, cfg) for name, enc in sources.items()}


def source_of(row: str) -> str:
    """A result row's feature source: 'random_mean' -> 'random', 'pixels_knn' -> 'pixels'."""
    prefix = row.split("_")[0]
    return prefix if prefix in ("random", "pixels") else "encoder"


def row_name(source: str, name: str) -> str:
    return name if source == "encoder" else f"{source}_{name}"


# -----------------------------------------------------------------------------
# Data: shards, padding, frozen-token caches

def train_transform(img_size: int, crop_scale_min: float):
    """MAE's linear probe: RandomResizedCrop + flip, no colour jitter; ImageNet mean/std."""
    return T.Compose([T.ToImage(),
                      T.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True),
                      T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def num_classes_of(ds) -> int:
    while isinstance(ds, Subset):
        ds = ds.dataset
    return len(ds.classes)


def shard_valid(num_items: int, world: int, rank: int) -> torch.Tensor:
    """DistributedSampler(shuffle=False) gives rank r the items r, r + W, r + 2W, ... and pads every
    shard to ceil(n / W) by repeating the first items. (ceil(n / W),) bool: True = a real item."""
    return rank + torch.arange(math.ceil(num_items / world)) * world < num_items


def eval_loader(ds, batch: int, world: int, rank: int, cfg: Config, device) -> DataLoader:
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=cfg.num_workers,
                      pin_memory=device.type == "cuda")


class Shard(NamedTuple):
    """One rank's share of a data set as frozen features: (M, ...) features, (M,) labels,
    (M,) valid."""
    feats: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor


def extract(sources: dict, loader, valid, cfg, device, keep=None) -> Shard:
    """Run the frozen sources once over a loader (no shuffling) -> Shard of {source: features};
    keep(features) picks what to store."""
    feats, labels = [], []
    for img, y in loader:
        f = features(sources, img.to(device, non_blocking=True), cfg)
        feats.append(keep(f) if keep is not None else f)
        labels.append(y.to(device))
    return Shard({s: torch.cat([f[s] for f in feats]) for s in feats[0]}, torch.cat(labels),
                 valid.to(device))


def knn_pooled(tokens: torch.Tensor, pools: List[str]) -> torch.Tensor:
    """(B, 1+N, D) -> (B, len(pools), D): the training-free features k-NN compares."""
    return torch.stack([losses.pool_tokens(tokens, p) for p in pools], dim=1)


def knn_pools(source: str, cfg: Config) -> List[str]:
    return ["cls"] if source == "pixels" else list(cfg.knn)  # the pixels are one token


def knn_keep(feats: dict, cfg: Config) -> dict:
    return {s: knn_pooled(t, knn_pools(s, cfg)) for s, t in feats.items()}


def gather_shards(shard: Shard) -> Shard:
    """Every rank's shard (equal lengths, thanks to the padding) concatenated, on every rank."""
    if not tdist.is_initialized():
        return shard

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, t.contiguous())
        return torch.cat(parts)
    return Shard({s: gather(f) for s, f in shard.feats.items()}, gather(shard.labels),
                 gather(shard.valid.to(torch.uint8)).bool())


def cached_train_batches(shard: Shard, batch: int, generator: torch.Generator):
    """One epoch over a cached shard in a fresh random order; the last partial batch is dropped so
    every rank takes the same number of steps (the shards have equal, padded lengths)."""
    order = torch.randperm(len(shard.labels), generator=generator).to(shard.labels.device)
    for i in range(0, len(order) - batch + 1, batch):
        idx = order[i: i + batch]
        yield {s: f[idx] for s, f in shard.feats.items()}, shard.labels[idx]


def streaming_train_batches(sources, loader, cfg, device):
    for img, y in loader:
        img, y = img.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield features(sources, img, cfg), y


def eval_batches(source, valid: torch.Tensor, batch: int, sources=None, cfg=None, device=None):
    """({source: features}, labels, valid) from a cached Shard, or from a loader of images through
    the frozen sources."""
    if isinstance(source, Shard):
        for i in range(0, len(source.labels), batch):
            yield ({s: f[i: i + batch] for s, f in source.feats.items()},
                   source.labels[i: i + batch], source.valid[i: i + batch])
        return
    start = 0
    for img, y in source:
        feats = features(sources, img.to(device, non_blocking=True), cfg)
        yield feats, y.to(device), valid[start: start + len(y)].to(device)
        start += len(y)


# -----------------------------------------------------------------------------
# Heads, optimizer, evaluation

class NormedClsHead(torch.nn.Module):
    """MAE's linear probe: [cls] after the encoder's final LayerNorm (a frozen copy; Identity when
    the features already have it) -> BatchNorm1d(affine=False) -> Linear."""

    def __init__(self, norm: torch.nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.norm = copy.deepcopy(norm).requires_grad_(False)
        self.probe = losses.ProbeHead("cls", dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, 1+N, D) -> logits (B, C)
        return self.probe(self.norm(tokens[:, :1]))


class Heads(torch.nn.ModuleDict):
    """{row: head}, trained together; each row reads its source's features (source_of)."""

    def forward(self, feats: dict) -> dict:
        return {row: head(feats[source_of(row)]) for row, head in self.items()}


def make_head(name: str, vit: M.ViT, cfg: Config, num_classes: int) -> torch.nn.Module:
    D = vit.cfg.embed_dim
    if name == "cls_norm":
        return NormedClsHead(torch.nn.Identity() if cfg.final_norm else vit.norm, D, num_classes)
    return losses.ProbeHead(name, D, num_classes, depth=cfg.abmilp_depth,
                            activation=cfg.abmilp_activation, self_attn=cfg.abmilp_self_attn,
                            pos_embed=cfg.abmilp_pos_embed, grid=vit.cfg.grid)


def build_heads(cfg: Config, vit: M.ViT, num_classes: int, sources: dict = None) -> Heads:
    """cfg.heads on every encoder of `sources`; on the pixels one linear probe ('pixels_linear')."""
    heads = Heads()
    for source, enc in (sources or feature_sources(cfg, vit)).items():
        torch.manual_seed(cfg.seed)  # every source's heads start alike: only the features differ
        if enc is None and cfg.heads:
            pixels = vit.cfg.in_chans * vit.cfg.img_size ** 2
            heads["pixels_linear"] = losses.ProbeHead("cls", pixels, num_classes)
        for name in cfg.heads if enc is not None else []:
            heads[row_name(source, name)] = make_head(name, enc, cfg, num_classes)
    return heads


HEAD_KEYS = ("heads", "block", "final_norm", "abmilp_depth", "abmilp_activation",
             "abmilp_self_attn", "abmilp_pos_embed", "baselines")


def load_heads(path: str, cfg: Config, vit: M.ViT, num_classes: int, sources: dict = None) -> Heads:
    """Heads saved by probe.py, checked to belong to the same features and head settings."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"trained heads '{path}' do not exist: run probe.py without "
                                "eval_only first, or set heads_path")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    old = {k: saved["config"].get(k, getattr(Config, k, None)) for k in HEAD_KEYS}  # older files
    diff = {k: v for k, v in old.items() if v != getattr(cfg, k)}
    if diff:
        raise ConfigError(f"the heads in '{path}' were trained with {diff}: use the same settings")
    heads = build_heads(cfg, vit, num_classes, sources)
    heads.load_state_dict(saved["heads"], strict=True)
    return heads


# the settings that shape the heads or their features: a resume must keep them
RESUME_KEYS = ("backbone", "backbone_format", "model", "patch_size", "layer_scale", "img_size",
               "dataset", "subset", *HEAD_KEYS)


def probe_state(heads: Heads, optimizer) -> dict:
    """What checkpoint.pth holds besides the position in the run: the heads and the optimizer."""
    return {"heads": heads.state_dict(), "optimizer": optimizer.state_dict()}


def load_probe_state(ckpt: dict, heads: Heads, optimizer, path: str):
    load_state(heads, ckpt["heads"], path)
    load_optimizer(optimizer, ckpt["optimizer"], path)


class LARS(torch.optim.Optimizer):
    """LARS (You et al., 2017) as in MAE's linear probe: SGD with momentum where the update of each
    weight matrix is scaled by trust_coefficient * ||w|| / ||g||; 1-d parameters are plain SGD."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:  # no decay, no trust ratio for biases
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0),
                                        g["trust_coefficient"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d = d.mul(trust)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


def sync_bn_stats(heads: torch.nn.Module):
    """Average the BN running statistics over ranks before evaluating or saving: each rank updated
    them from its own micro-batches, and every rank must evaluate the same heads."""
    for name, buf in heads.named_buffers():
        if "running_" in name:
            buf.copy_(all_reduce_mean(buf))


@torch.no_grad()
def evaluate(heads: Heads, batches) -> dict:
    """{head: (correct top-1, correct top-5, images)} over the real images of every rank's shard."""
    heads.eval()
    counts = None
    for feats, labels, valid in batches:
        if counts is None:
            counts = torch.zeros(len(heads), 3, dtype=torch.long, device=labels.device)
        for i, logits in enumerate(heads(feats).values()):
            top1, top5 = losses.topk_correct(logits, labels)
            counts[i] += torch.stack([top1[valid].sum(), top5[valid].sum(), valid.sum()])
    counts = all_reduce_sum(counts)
    return {name: tuple(counts[i].tolist()) for i, name in enumerate(heads)}


def knn_counts(bank: torch.Tensor, bank_labels, val: torch.Tensor, val_labels, valid,
               num_classes: int, cfg: Config) -> tuple:
    """DINO's weighted k-NN after subtracting the bank's mean feature from both sides (knn_centre;
    pretrain.knn_top1's protocol) -> (correct top-1, correct top-5, images), summed over ranks."""
    centre = bank.mean(0, keepdim=True) if cfg.knn_centre else torch.zeros_like(bank[:1])
    votes = losses.knn_votes(bank - centre, bank_labels, val - centre, num_classes, cfg.knn_k,
                             cfg.knn_temperature)
    top1, top5 = losses.topk_correct(votes.log(), val_labels)     # log: no vote = -inf = no guess
    counts = torch.stack([top1[valid].sum(), top5[valid].sum(), valid.sum()])
    return tuple(all_reduce_sum(counts).tolist())


def knn_evaluate(bank: Shard, val: Shard, num_classes: int, cfg: Config) -> dict:
    """k-NN of every real val image of this rank against the whole (de-padded) training bank, for
    every source and pool: {row: counts}. Features: {source: (M, pools, D')}."""
    bank = gather_shards(bank)
    labels = bank.labels[bank.valid]
    out = {}
    for source, feats in bank.feats.items():
        for i, pool in enumerate(knn_pools(source, cfg)):
            row = "pixels_knn" if source == "pixels" else row_name(source, f"knn_{pool}")
            out[row] = knn_counts(feats[bank.valid][:, i], labels, val.feats[source][:, i],
                                  val.labels, val.valid, num_classes, cfg)
    return out


def results_table(counts: dict) -> dict:
    return {name: {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n, "correct_top1": c1,
                   "correct_top5": c5, "images": n} for name, (c1, c5, n) in counts.items()}


READS = {"cls": "[cls] token", "mean": "mean of the patch tokens",
         "abmilp": "AbMILP over the patch tokens",
         "cls_norm": "[cls] after the final LayerNorm (MAE's linear probe)",
         "knn_cls": "k-NN on the [cls] token", "knn_mean": "k-NN on the patch mean",
         "pixels_linear": "BASELINE raw pixels: linear probe (BN -> Linear) on the image",
         "pixels_knn": "BASELINE raw pixels: k-NN on the image"}


def reads(row: str) -> str:
    """What a result row reads, in words; the random-init baseline rows say so."""
    if source_of(row) == "random":
        return "BASELINE random-init encoder: " + READS[row[len("random_"):]]
    return READS[row]


def protocol_of(cfg: Config, vit: M.ViT, cached: bool, lr: float, train_images: int,
                val_images: int, num_classes: int, world: int, rows) -> dict:
    """Every choice a reader needs to interpret the numbers (DECISIONS.md, section 8)."""
    depth = len(vit.blocks)
    block = cfg.block % depth
    return {
        "backbone": cfg.backbone, "backbone_format": cfg.backbone_format,
        "architecture": asdict(vit.cfg),
        "backbone_mode": "eval() (no dropout, no drop path), requires_grad=False, torch.no_grad; "
                         "bf16 on CUDA",
        "features": f"output of block {block} (0-based) of {depth}, "
                    f"{'after' if cfg.final_norm else 'before'} the final LayerNorm",
        "block": block, "num_blocks": depth, "final_norm": cfg.final_norm,
        "tokens": {n: reads(n) for n in rows},
        "head": "pool -> BatchNorm1d(D, affine=False, eps=1e-6) -> Linear(D, C), "
                "Linear init N(0, 0.01)",
        "abmilp": {"over": "patch tokens only (no [cls])", "depth": cfg.abmilp_depth,
                   "activation": cfg.abmilp_activation, "self_attn": cfg.abmilp_self_attn,
                   "pos_embed": cfg.abmilp_pos_embed},
        "knn": {"k": cfg.knn_k, "temperature": cfg.knn_temperature, "similarity": "cosine",
                "weights": "exp(sim / T)", "bank": "all training images, eval transform",
                "centred": "bank mean subtracted from bank and queries" if cfg.knn_centre else "no",
                "top5": "classes without a vote never count"},
        "baselines": {"random": f"the backbone's architecture, random init (seed {cfg.seed}), "
                                "the same block and final_norm",
                      "pixels": "the eval-transformed image, flattened (C*H*W), as one token"}
        if cfg.baselines else "off",
        "path": "cached" if cached else "streaming",
        "train_augmentation": "none (tokens extracted once with the eval transform)" if cached
        else f"RandomResizedCrop(scale=({cfg.crop_scale_min}, 1)) + horizontal flip",
        "eval_transform": "data.eval_transform: resize + centre crop, ImageNet mean/std",
        "optimizer": cfg.optimizer + " (momentum 0.9"
                     + (", trust 0.001)" if cfg.optimizer == "lars" else ")"),
        "lr": lr, "blr": cfg.blr, "batch_size": cfg.batch_size, "weight_decay": cfg.weight_decay,
        "epochs": cfg.epochs, "warmup_epochs": cfg.warmup_epochs,
        "schedule": "linear warmup + half-cosine, per step",
        "eval_only": cfg.eval_only,
        "reported": "after the last epoch (no selection on the validation set)",
        "train_images": train_images, "val_images": val_images, "num_classes": num_classes,
        "world_size": world,
    }


# -----------------------------------------------------------------------------
# Setup: the backbone, the data (cached or streamed), the heads and their optimizer

def build_backbone(cfg: Config, device) -> tuple:
    """-> (the frozen backbone, {source: encoder}): features = the output of block `block`
    (+ the final norm if asked); with baselines also a random-init encoder and the pixels."""
    vit = load_backbone(cfg).to(device)
    depth = len(vit.blocks)
    if not -depth <= cfg.block < depth:
        raise ConfigError(f"config key 'block' must be in [-{depth}, {depth - 1}] for this "
                          f"{depth}-block backbone, got {cfg.block}")
    print0(f"backbone {cfg.backbone} ({cfg.backbone_format}): {depth} blocks x "
           f"{vit.cfg.embed_dim}d, {vit.num_patches} patches; features = block "
           f"{cfg.block % depth} output, {'with' if cfg.final_norm else 'without'} the final norm")
    sources = feature_sources(cfg, vit)
    if cfg.baselines:
        print0(f"baselines: a random-init encoder of this architecture (seed {cfg.seed}) and raw "
               "pixels, through the same heads and k-NN on the same split")
    return vit, sources


class EvalData(NamedTuple):
    """The training and validation sets with the eval transform, each rank's shard in order:
    DistributedSampler pads the shards, `*_valid` marks the real images."""
    train: Dataset
    val: Dataset
    train_loader: DataLoader
    val_loader: DataLoader
    train_valid: torch.Tensor
    val_valid: torch.Tensor
    num_classes: int


def build_eval_data(cfg: Config, dist, img_size: int, micro_batch: int) -> EvalData:
    tf = data.eval_transform(img_size)
    train = data.build_dataset(cfg.dataset, cfg.data_path, train=True, transform=tf,
                               subset=cfg.subset)
    val = data.build_dataset(cfg.dataset, cfg.data_path, train=False, transform=tf,
                             subset=cfg.val_subset)
    num_classes = num_classes_of(val)
    print0(f"{len(train)} training and {len(val)} validation images, {num_classes} classes")
    w, r = dist.world, dist.rank
    return EvalData(train, val, eval_loader(train, micro_batch, w, r, cfg, dist.device),
                    eval_loader(val, micro_batch, w, r, cfg, dist.device),
                    shard_valid(len(train), w, r), shard_valid(len(val), w, r), num_classes)


class Cache(NamedTuple):
    """The cached path's frozen features, each rank's shard: train (None when no head trains)
    and val."""
    train: Optional[Shard]
    val: Shard


def extract_cache(cfg: Config, vit: M.ViT, sources: dict, ev: EvalData, train: bool,
                  device) -> Optional[Cache]:
    """The cached path (when the features fit in cache_max_gb, or cache=always): the frozen
    features of both sets, extracted once with the eval transform. None: the streaming path."""
    img_size = vit.cfg.img_size
    per_image = sum((1 + vit.num_patches) * vit.cfg.embed_dim if enc is not None
                    else vit.cfg.in_chans * img_size ** 2 for enc in sources.values())
    cache_gb = (len(ev.train) + len(ev.val)) * per_image * 4 / 1e9
    cached = cfg.cache == "always" or (cfg.cache == "auto" and cache_gb <= cfg.cache_max_gb)
    if cfg.baselines and not cached:
        raise ConfigError(f"baselines=true needs the cached path, but the features would take "
                          f"{cache_gb:.1f} GB (cache={cfg.cache}, cache_max_gb="
                          f"{cfg.cache_max_gb}): "
                          "raise cache_max_gb, lower subset, or set baselines=false")
    if not cached:
        print0("path: streaming - the backbone runs every step on RandomResizedCrop(scale="
               f"({cfg.crop_scale_min}, 1)) + flip views (a cache would take {cache_gb:.1f} GB > "
               f"cache_max_gb={cfg.cache_max_gb})")
        return None
    print0(f"path: cached - frozen tokens extracted once ({cache_gb:.2f} GB), heads trained on "
           "the cache, no augmentation")
    train_cache = extract(sources, ev.train_loader, ev.train_valid, cfg, device) if train else None
    val_cache = extract(sources, ev.val_loader, ev.val_valid, cfg, device)
    check_corrupt(data.corrupt_count(ev.train) + data.corrupt_count(ev.val),
                  len(ev.train) + len(ev.val), cfg.max_corrupt_frac, device)
    return Cache(train_cache, val_cache)


def build_train_data(cfg: Config, dist, img_size: int, cache: Optional[Cache], micro_batch: int,
                     num_images: int) -> tuple:
    """-> (loader, steps per epoch). Streaming: a loader of RandomResizedCrop + flip views,
    augmentation seeded by (seed, epoch, index), that resumes mid-epoch. Cached: no loader."""
    if cache is not None:
        loader, micro_batches = None, len(cache.train.labels) // micro_batch
    else:
        dataset = data.SeededImages(data.build_dataset(
            cfg.dataset, cfg.data_path, train=True, subset=cfg.subset,
            transform=train_transform(img_size, cfg.crop_scale_min)), cfg.seed)
        loader = train_loader(dataset, micro_batch, dist, cfg.seed, cfg.num_workers)
        micro_batches = len(loader)
    if micro_batches < cfg.accum_steps:
        raise ConfigError(f"{num_images} training images are fewer than one global batch "
                          f"({cfg.batch_size}): lower batch_size")
    return loader, micro_batches // cfg.accum_steps


def train_batches(cfg: Config, run: Run, epoch: int, cache: Optional[Cache], loader,
                  sources: dict):
    """This epoch's training batches, ({source: (B, T, D')}, (B,) labels), from where a resumed
    epoch left off: the cache in a new order each epoch, depending only on (seed, epoch, rank),
    or the backbone on the loader's views."""
    if cache is None:
        batches = run.epoch_batches(epoch, loader)
        return streaming_train_batches(sources, batches, cfg, run.dist.device)
    gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + epoch) * 1009 + run.dist.rank)
    return itertools.islice(cached_train_batches(cache.train, run.micro_batch, gen),
                            run.seen(epoch), None)


def build_probe(cfg: Config, dist, vit: M.ViT, sources: dict, num_classes: int, lr: float,
                heads_path: str, train: bool) -> tuple:
    """-> (heads, optimizer, the module the loop calls). Training: new heads, MAE's linear-probe
    optimizer (LARS or SGD, momentum 0.9), in DDP with several processes. eval_only: the trained
    heads from heads_path. No heads (k-NN only): None."""
    if not cfg.heads:
        return None, None, None
    if not train:
        heads = load_heads(heads_path, cfg, vit, num_classes, sources).to(dist.device)
        print0(f"eval_only: heads {list(heads)} from {heads_path}")
        return heads, None, heads
    torch.manual_seed(cfg.seed)  # the same initial heads on every rank
    heads = build_heads(cfg, vit, num_classes, sources).to(dist.device)
    params = [p for p in heads.parameters() if p.requires_grad]
    if cfg.optimizer == "lars":
        optimizer = LARS(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    print0(f"heads {list(heads)}: {sum(p.numel() for p in params) / 1e3:.1f}k parameters; "
           f"{cfg.optimizer}, lr {lr:.4g}")
    return heads, optimizer, ddp(heads, dist)


def heads_output(heads: Heads, cfg: Config) -> dict:
    """heads.pth: what eval_only and experiments/attention_analysis.py read."""
    return {"heads": heads.state_dict(), "config": config_dict(cfg)}


# -----------------------------------------------------------------------------
# Evaluation and results

def evaluate_epoch(run: Run, heads: Heads, batches, epochs_done: int):
    """Every head's top-1 during training, printed and logged (after the last epoch:
    final_evaluation)."""
    acc = results_table(evaluate(heads, batches))
    print0(f"epoch {epochs_done}: " + ", ".join(f"{n} {r['top1']:.2f}" for n, r in acc.items()))
    if run.dist.main:
        log_json(run.log_path, {"epoch": epochs_done,
                                **{f"val_top1_{n}": r["top1"] for n, r in acc.items()}})


def val_batches(cache: Optional[Cache], ev: EvalData, sources: dict, cfg: Config,
                micro_batch: int, device):
    """The val set's ({source: features}, labels, valid): from the cache, or the backbone on the
    loader's images."""
    source = cache.val if cache is not None else ev.val_loader
    return eval_batches(source, ev.val_valid, micro_batch, sources, cfg, device)


def knn_shard(shard: Shard, cfg: Config) -> Shard:
    return Shard(knn_keep(shard.feats, cfg), shard.labels, shard.valid)


def final_evaluation(cfg: Config, heads, val_batches, cache: Optional[Cache], ev: EvalData,
                     sources: dict, device) -> dict:
    """The heads on every rank's shard of the val set (counts summed), and k-NN of each val image
    against the gathered training bank -> the results table, the encoder's rows first, then each
    baseline's."""
    results = {}
    if cfg.heads:
        results.update(evaluate(heads, val_batches))
    if cfg.knn:
        keep = lambda f: knn_keep(f, cfg)  # noqa: E731
        if cache is not None and cache.train is not None:
            bank = knn_shard(cache.train, cfg)
        else:
            bank = extract(sources, ev.train_loader, ev.train_valid, cfg, device, keep)
        val = knn_shard(cache.val, cfg) if cache is not None \
            else extract(sources, ev.val_loader, ev.val_valid, cfg, device, keep)
        results.update(knn_evaluate(bank, val, ev.num_classes, cfg))
    order = {"encoder": 0, "random": 1, "pixels": 2}
    return results_table(dict(sorted(results.items(), key=lambda kv: order[source_of(kv[0])])))


def write_results(cfg: Config, vit: M.ViT, table: dict, cached: bool, lr: float, ev: EvalData,
                  dist, heads_path: str):
    """The results table on stdout, and results.json with every protocol choice (rank 0)."""
    protocol = protocol_of(cfg, vit, cached, lr, len(ev.train), len(ev.val), ev.num_classes,
                           dist.world, list(table))
    if cfg.eval_only:
        protocol["heads_path"] = heads_path
    print0(f"\n{'head':<16} {'top-1':>7} {'top-5':>7} {'images':>7}  reads")
    for name, r in table.items():
        print0(f"{name:<16} {r['top1']:>7.2f} {r['top5']:>7.2f} {r['images']:>7d}  {reads(name)}")
    if dist.main:
        out = {"accuracy": {n: r["top1"] for n, r in table.items()}, "results": table,
               "protocol": protocol, "config": config_dict(cfg)}
        with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
            json.dump(out, f, indent=2)
    print0(f"done: {cfg.out_dir}/results.json")


# -----------------------------------------------------------------------------
# The probe: every head on the same frozen tokens, one backward for all; then the evaluation

def main(argv):
    cfg = parse_config(Config, argv)
    dist = setup_distributed(cfg.device, cfg.dist_timeout_s)
    train = bool(cfg.heads) and not cfg.eval_only  # else: saved heads (eval_only), k-NN
    run = Run(cfg, dist, config_dict(cfg), RESUME_KEYS if train else None)  # config checked
    device, micro_batch = dist.device, run.micro_batch
    vit, sources = build_backbone(cfg, device)  # {encoder (+ random init, pixels)}
    ev = build_eval_data(cfg, dist, vit.cfg.img_size, micro_batch)
    cache = extract_cache(cfg, vit, sources, ev, train, device)  # None: the streaming path
    val = lambda: val_batches(cache, ev, sources, cfg, micro_batch, device)  # noqa: E731
    lr = cfg.blr * cfg.batch_size / 256  # MAE: lr = blr * batch / 256
    heads_path = cfg.heads_path or run.path("heads.pth")
    heads, optimizer, model = build_probe(cfg, dist, vit, sources, ev.num_classes, lr,
                                          heads_path, train)
    heads_file = lambda: {heads_path: heads_output(heads, cfg)}  # noqa: E731
    if train:
        loader, steps_per_epoch = build_train_data(cfg, dist, vit.cfg.img_size, cache,
                                                   micro_batch, len(ev.train))
        run.resume(steps_per_epoch,
                   lambda ckpt: load_probe_state(ckpt, heads, optimizer, run.ckpt_path),
                   lambda: probe_state(heads, optimizer), data_keys="batch_size and cache")
        lr_at = cosine_schedule(cfg, lr, steps_per_epoch)  # MAE's linear probe schedule

    for epoch in run.epochs() if train else ():
        batches = train_batches(cfg, run, epoch, cache, loader, sources)
        heads.train()
        for step in run.steps(epoch):  # a progress bar; log, stop signal, corrupt data: `run`
            run.set_lr(optimizer, lr_at[step])
            for micro in range(cfg.accum_steps):
                feats, labels = next(batches)                 # {source: (B, T, D')}, (B,)
                with no_sync(model, micro, cfg.accum_steps):
                    loss, each = losses.probe_loss(model(feats), labels)  # sum over the heads
                    (loss / cfg.accum_steps).backward()
                run.add({f"loss_{name}": value for name, value in each.items()})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        run.end_epoch(epoch)  # stopped by a signal mid-epoch: save and exit
        sync_bn_stats(heads)  # every rank evaluates and saves the same heads
        done = epoch + 1
        if done % cfg.eval_every == 0 and done < cfg.epochs:  # the last: final_evaluation
            evaluate_epoch(run, heads, val(), done)
        run.save(done, heads_file() if done == cfg.epochs else {})
        run.exit_if_stopped(done)
    if train:
        run.finish(heads_file())  # a rerun of a finished run: rewrite a lost heads.pth

    table = final_evaluation(cfg, heads, val(), cache, ev, sources, device)
    write_results(cfg, vit, table, cache is not None, lr, ev, dist, heads_path)


if __name__ == "__main__":
    run_main(main)
