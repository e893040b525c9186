"""End-to-end fine-tuning with the DTM paper's recipe (Table 13), and export to timm.

Paper: "Masked Image Modeling via Dynamic Token Morphing", Kim, Heo, Han, arXiv:2401.00254
(Table 13, after BEiT v2, arXiv:2208.06366). Choices they leave open, and where this code differs
from BEiT v2 / timm: DECISIONS.md, section 5.

    # Fashion-MNIST on a CPU, from the default pre-trained encoder (or init= for scratch)
    python finetune.py --config configs/fmnist_finetune.yaml init=runs/fmnist_dtm/encoder.pth
    # ImageNet-1k, ViT-B/16, 8 GPUs
    torchrun --nproc_per_node=8 finetune.py --config configs/in1k_vit_base_finetune.yaml \
        data_path=/data/imagenet init=runs/in1k_vit_base_dtm/encoder.pth

The recipe: AdamW with layer-wise lr decay, warmup + cosine, drop path, label smoothing,
Mixup/CutMix, RandAugment, random erasing; the head on [cls] or on the LayerNorm'd mean of the
patch tokens (global_pool=avg, BEiT v2's default); relative position bias per block (a shared
table from pre-training is copied into every block). out_dir keeps checkpoint.pth (auto-resume),
best.pth, log.jsonl, and model_timm.pth: the model in timm's format with the arguments to build it.
"""
from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

import common
import data
import losses
import model
from model import VIT_SIZES  # (inside Config, `model` is the field)
from common import (NO_DECAY, Run, cosine_schedule, ddp, shard, all_reduce_sum,
                    load_optimizer, load_state, log_json, no_sync, parse_config, print0,
                    read_weights, run_main, save_atomic, setup_distributed, ConfigError)


RANDAUG_LEVELS = 10  # timm's magnitude scale 0..10 ("m9" = 90% of each operation's range)


@dataclass
class Config:
    # data
    dataset: str = "fashion_mnist"   # fashion_mnist | imagefolder | cifar10 | cifar100
    data_path: str = "data"
    subset: int = 0                  # use `subset` training images, evenly spaced (0 = all)
    img_size: int = 28
    num_workers: int = 2
    # model
    init: str = ""                   # encoder.pth of pretrain.py, timm/MAE weights, "" = scratch
    model: str = "vit_tiny"          # architecture when init is "" or a timm/MAE file
    patch_size: int = 4
    pos_embed: str = "learned"       # (scratch / timm file only; an encoder.pth keeps its own)
    rel_pos_bias: bool = True        # Table 13: relative position bias per block
    layer_scale: float = 0.1
    drop_path: float = 0.1           # Table 13: 0.1 S/B, 0.2 L
    global_pool: str = "token"       # head on [cls] (token) | LayerNorm(patch mean) (avg, BEiT v2)
    # recipe (Table 13)
    epochs: int = 100
    warmup_epochs: int = 10
    batch_size: int = 1024           # global batch
    accum_steps: int = 1
    lr: float = 0.0                  # peak lr as given (BEiT v2 convention); > 0: blr is ignored
    blr: float = 5e-4                # MAE convention, when lr = 0: peak lr = blr * batch_size / 256
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.6         # 0.6 S/B, 0.8 L
    label_smoothing: float = 0.1
    mixup: float = 0.8               # Mixup alpha (0 = off)
    cutmix: float = 1.0              # CutMix alpha (0 = off); one of the two is drawn per batch
    randaug_ops: int = 2             # RandAugment 9/0.5: 2 ops of magnitude 9 ...
    randaug_magnitude: int = 9       # ... on timm's scale 0..10 (torchvision's, 11 bins)
    reprob: float = 0.25             # random erasing probability (per-pixel N(0, 1) values)
    crop_scale_min: float = 0.08
    # run
    out_dir: str = "runs/finetune"
    log_every: int = 20              # steps between log lines (loss reduced, signals checked)
    dist_timeout_s: int = 600        # after start-up: a collective waiting longer fails the run
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"          # auto (bf16 where the hardware has it) | bf16 | fp32

    CHOICES = {"dataset": data.DATASETS, "model": VIT_SIZES, "device": ("auto", "cpu", "cuda"),
               "precision": common.PRECISIONS, "global_pool": ("token", "avg")}
    LIMITS = {"layer_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
              "randaug_magnitude": (lambda v: 0 <= v <= RANDAUG_LEVELS,
                                    f"in [0, {RANDAUG_LEVELS}] (timm's scale)")}


# the settings that shape the classifier or its data: a resume must keep them
RESUME_KEYS = ("dataset", "subset", "img_size", "model", "patch_size", "pos_embed", "rel_pos_bias",
               "layer_scale", "global_pool")


def peak_lr(cfg: Config):
    """-> (peak lr, how it was obtained): lr as given (BEiT v2) if > 0, else blr * batch / 256."""
    if cfg.lr > 0:
        return cfg.lr, f"peak lr {cfg.lr:.3g} (lr, as given: BEiT v2 convention)"
    lr = cfg.blr * cfg.batch_size / 256
    return lr, f"peak lr {lr:.3g} (blr {cfg.blr:g} x batch {cfg.batch_size} / 256: MAE convention)"


# -----------------------------------------------------------------------------
# The classifier: from an encoder file, a timm/MAE file, or from scratch

def build_model(cfg: Config, num_classes: int) -> model.ViT:
    """The classifier: encoder weights (if any) + a new Linear head on [cls] (global_pool=token)
    or on a new LayerNorm of the patch-token mean (avg: fc_norm, the final norm dropped)."""
    vit_cfg = dict(model.VIT_SIZES[cfg.model], img_size=cfg.img_size, patch_size=cfg.patch_size,
                   pos_embed=cfg.pos_embed, rel_pos_bias=cfg.rel_pos_bias,
                   layer_scale=cfg.layer_scale)
    state = None
    if cfg.init:
        ckpt = read_weights(cfg.init, "init")
        if "config" in ckpt and "model" in ckpt:        # an encoder of this project
            vit_cfg = dict(ckpt["config"])
            state = dict(ckpt["model"])
            if vit_cfg.get("shared_rel_pos_bias"):  # BEiT: copy the shared table into each block
                shared = state.pop("rel_pos_bias.relative_position_bias_table")
                for i in range(vit_cfg["depth"]):  # biases add: own + shared, features unchanged
                    own = f"blocks.{i}.attn.relative_position_bias_table"
                    state[own] = state[own] + shared if own in state else shared.clone()
                vit_cfg.update(shared_rel_pos_bias=False, rel_pos_bias=True)
        else:                                           # timm / MAE format
            state = model.from_timm(ckpt)
    vit_cfg.update(num_classes=num_classes, drop_path=cfg.drop_path, global_pool=cfg.global_pool)
    try:
        vit = model.ViT(model.ViTConfig(**vit_cfg))
    except TypeError as e:
        raise ConfigError(f"config key 'init': '{cfg.init}' holds an unknown architecture "
                          f"({e})") from None
    if state is not None:
        fresh = vit.state_dict()
        # avg: the final norm has no place (BEiT v2, MAE): fc_norm, after the pooling, starts fresh
        unused = ("head.", "norm.") if cfg.global_pool == "avg" else ("head.",)
        dropped = [k for k in state if k.startswith(unused)]
        state = {k: v for k, v in state.items() if k not in dropped}
        new = [k for k in fresh if k not in state]  # head, fc_norm (+ mask token for timm files)
        state.update({k: fresh[k] for k in new})
        load_state(vit, state, cfg.init)
        print0(f"loaded {cfg.init}; not used: {dropped}; newly initialised: {new}")
    torch.nn.init.trunc_normal_(vit.head.weight, std=2e-5)  # MAE: a near-zero head at the start
    torch.nn.init.zeros_(vit.head.bias)
    # a classifier never masks: without a gradient DDP does not wait for the mask token's (it
    # would stop at step 2 with "parameters that were not used"); kept in the state dict
    vit.mask_token.requires_grad_(False)
    return vit


def layer_decay_groups(vit: model.ViT, weight_decay: float, layer_decay: float) -> list:
    """Parameter groups with lr_scale = layer_decay^(depth + 1 - layer) (BEiT/MAE): the embeddings
    are layer 0, block i is layer i + 1, the final norm and head depth + 1. No weight decay on
    norms, biases, tokens and position tables."""
    depth, groups = vit.cfg.depth, {}
    for name, p in vit.named_parameters():
        if not p.requires_grad:
            continue
        layer = depth + 1
        if name.startswith(("cls_token", "mask_token", "pos_embed", "patch_embed", "rel_pos_bias")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        no_decay = p.ndim <= 1 or any(k in name for k in NO_DECAY)
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def export_timm(vit: model.ViT) -> dict:
    """The fine-tuned model in timm's format, with the arguments that build the timm model."""
    c = vit.cfg
    args = dict(img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                num_heads=c.num_heads, num_classes=c.num_classes, global_pool=c.global_pool,
                init_values=c.layer_scale or None)
    beit = c.rel_pos_bias or c.shared_rel_pos_bias
    if beit:
        args.update(use_abs_pos_emb=c.pos_embed != "none", use_rel_pos_bias=c.rel_pos_bias,
                    use_shared_rel_pos_bias=c.shared_rel_pos_bias)
    elif c.pos_embed == "none":
        args.update(pos_embed="none")
    return {"arch": "Beit" if beit else "VisionTransformer", "args": args,
            "model": model.to_timm(vit.state_dict())}


# -----------------------------------------------------------------------------
# Data: RandAugment + random erasing per image; Mixup/CutMix per batch

def rand_augment(cfg: Config):
    """timm's RandAugment: randaug_ops operations drawn with replacement, each applied with
    probability 0.5, on timm's magnitude scale (11 bins: magnitude m is m / 10 of each operation's
    range, as rand-m9), filled with the ImageNet mean grey as timm (0 after normalisation). What
    still differs from rand-m9-mstd0.5-inc1: DECISIONS.md, section 5."""
    grey = [round(255 * m) for m in data.IMAGENET_MEAN]
    ops = [T.RandomApply([T.RandAugment(1, cfg.randaug_magnitude, RANDAUG_LEVELS + 1, fill=grey,
                                        interpolation=T.InterpolationMode.BILINEAR)], p=0.5)
           for _ in range(cfg.randaug_ops)]
    return T.Compose(ops) if ops else T.Identity()


def train_transform(cfg: Config):
    """timm/BEiT v2: bicubic RandomResizedCrop, flip, RandAugment, normalise, random erasing with
    per-pixel N(0, 1) values (timm's mode 'pixel' = torchvision's value='random')."""
    crop = T.RandomResizedCrop(cfg.img_size, scale=(cfg.crop_scale_min, 1.0), antialias=True,
                               interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([T.ToImage(), crop, T.RandomHorizontalFlip(), rand_augment(cfg),
                      T.ToDtype(torch.float32, scale=True),
                      T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
                      T.RandomErasing(cfg.reprob, value="random")])


def mix_batch(cfg: Config, num_classes: int):
    """Mixup or CutMix (one drawn per batch), then label smoothing: soft targets (B, classes)."""
    mixes = [T.MixUp(alpha=cfg.mixup, num_classes=num_classes)] if cfg.mixup > 0 else []
    mixes += [T.CutMix(alpha=cfg.cutmix, num_classes=num_classes)] if cfg.cutmix > 0 else []
    mix = T.RandomChoice(mixes) if mixes else None
    eps = cfg.label_smoothing

    def apply(img, labels):
        img, target = mix(img, labels) if mix else (img, F.one_hot(labels, num_classes).float())
        return img, target * (1 - eps) + eps / num_classes
    return apply


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-sum_c t_c log softmax(z)_c, mean over the batch (t sums to 1 per sample)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def build_data(cfg: Config, dist, micro_batch: int):
    """-> (training loader: augmentation seeded by (seed, epoch, index); validation loader: a
    shard per rank; number of classes)."""
    train = data.build_dataset(cfg.dataset, cfg.data_path, train=True, subset=cfg.subset,
                               transform=train_transform(cfg))
    val = data.build_dataset(cfg.dataset, cfg.data_path, train=False,
                             transform=data.eval_transform(cfg.img_size))
    loader = common.train_loader(data.SeededImages(train, cfg.seed), micro_batch, dist, cfg.seed,
                                 cfg.num_workers)
    val_loader = DataLoader(val, batch_size=micro_batch, num_workers=cfg.num_workers,
                            sampler=shard(len(val), dist.rank, dist.world))
    print0(f"{len(train)} training / {len(val)} validation images, {len(val.classes)} "
           f"classes, {len(loader) // cfg.accum_steps} steps per epoch")
    return loader, val_loader, len(val.classes)


# -----------------------------------------------------------------------------
# Evaluation

@torch.no_grad()
def evaluate(vit, loader, run: Run, epochs_done: int) -> float:
    """Top-1 / top-5 on every rank's shard, counts summed across ranks; printed, logged. -> top-1"""
    vit.eval()
    device = run.dist.device
    counts = torch.zeros(3, device=device)  # correct@1, correct@5, images
    for img, labels in loader:
        img, labels = img.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            top1, top5 = losses.topk_correct(vit(img), labels)
        counts += torch.stack([top1.sum(), top5.sum(), torch.tensor(len(labels), device=device)])
    correct1, correct5, total = all_reduce_sum(counts).tolist()
    record = {"epoch": epochs_done, "step": run.step, "val_top1": 100.0 * correct1 / total,
              "val_top5": 100.0 * correct5 / total, "val_count": int(total)}
    print0(f"epoch {epochs_done}: top-1 {record['val_top1']:.2f}  top-5 {record['val_top5']:.2f}")
    if run.dist.main:
        log_json(run.log_path, record)
    return record["val_top1"]


# -----------------------------------------------------------------------------
# The training loop

def main(argv):
    cfg = parse_config(Config, argv)
    dist = setup_distributed(cfg.device, cfg.dist_timeout_s)
    run = Run(cfg, dist, RESUME_KEYS)  # out_dir locked, config checked
    loader, val_loader, num_classes = build_data(cfg, dist, run.micro_batch)
    mix = mix_batch(cfg, num_classes)  # Mixup / CutMix, then label smoothing: soft targets
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    vit = build_model(cfg, num_classes).to(dist.device)
    lr, note = peak_lr(cfg)
    print0(note)
    optimizer = torch.optim.AdamW(layer_decay_groups(vit, cfg.weight_decay, cfg.layer_decay),
                                  lr=lr, betas=(0.9, 0.999), fused=dist.device.type == "cuda")
    steps_per_epoch = len(loader) // cfg.accum_steps
    best = 0.0  # the best top-1 so far (best.pth)

    def load(ckpt):
        load_state(vit, ckpt["model"], run.ckpt_path)
        load_optimizer(optimizer, ckpt["optimizer"], run.ckpt_path)
    ckpt = run.resume(steps_per_epoch, load,
                      lambda: {"model": vit.state_dict(), "optimizer": optimizer.state_dict(),
                               "best": best, "vit_config": asdict(vit.cfg)})
    best = ckpt["best"] if ckpt is not None else best
    timm_file = lambda: {run.path("model_timm.pth"): export_timm(vit)}  # noqa: E731
    lr_at = cosine_schedule(cfg, lr, steps_per_epoch)  # warm-up, then cosine to min_lr
    net = ddp(vit, dist)
    autocast = common.autocast(cfg.precision, dist.device)  # bf16 where native (precision)

    for epoch in run.epochs():
        batches = run.epoch_batches(epoch, loader)
        net.train()
        for step in run.steps(epoch):  # a progress bar; log, stop signal: `run`
            run.set_lr(optimizer, lr_at[step])  # times each group's lr_scale (layer decay)
            for micro in range(cfg.accum_steps):
                img, labels = next(batches)
                img, target = mix(img, labels)                    # (B, C, H, W), (B, classes)
                img = img.to(dist.device, non_blocking=True)
                target = target.to(dist.device, non_blocking=True)
                with autocast, no_sync(net, micro, cfg.accum_steps):
                    loss = soft_cross_entropy(net(img), target)
                    (loss / cfg.accum_steps).backward()
                run.add({"loss": loss})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        run.end_epoch(epoch)  # stopped by a signal mid-epoch: save and exit
        done = epoch + 1
        top1 = evaluate(vit, val_loader, run, done)
        if top1 > best:
            best = top1
            if dist.main:
                save_atomic({"config": asdict(vit.cfg), "model": vit.state_dict(), "top1": best},
                            run.path("best.pth"))
        run.save(done, timm_file() if done == cfg.epochs else {})
        run.exit_if_stopped(done)
    print0(f"best top-1 {best:.2f}; timm export in {run.path('model_timm.pth')}")


if __name__ == "__main__":
    run_main(main)
