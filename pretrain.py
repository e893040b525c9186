"""Masked image modeling pre-training: DTM distillation, SimMIM or MAE, with or without MTO.

Papers: "Masked Image Modeling via Dynamic Token Morphing", Kim, Heo, Han, arXiv:2401.00254 (DTM);
"Emerging Property of Masked Token for Effective Pre-training", Choi et al., arXiv:2404.08330
(MTO). Choices they leave open: DECISIONS.md.

    python pretrain.py --config configs/fmnist_dtm.yaml        # the default job (2-core CPU)
    python pretrain.py --config configs/fmnist_simmim_mto.yaml # SimMIM + MTO (also: _mae_mto)
    torchrun --nproc_per_node=8 pretrain.py --config configs/in1k_vit_base_dtm.yaml \
        data_path=/data/imagenet                                # DTM's ViT-B/16 recipe, CLIP

Per step: the teacher sees the full image and gives target tokens v (B, N, C); the student sees
the same view with masked patches replaced by e_[M] and gives u = h(f(x^M)) (B, N, C); the loss
morphs both with the morphing computed from v and compares them (losses.dtm_loss, Eqs. 1-5).
framework=simmim|mae (MTO paper) replaces the teacher with pixel reconstruction of the masked
patches (model.SimMIM, model.MAE; losses.pixel_loss, Eq. 1); mto=true adds the MTO terms
(losses.mto_losses, Eqs. 3-5) over the blocks that hold the mask tokens: SimMIM's encoder, MAE's
decoder. A run directory holds config.yaml, log.jsonl, checkpoint.pth (resumed automatically)
and encoder.pth (the encoder alone, for probe.py, finetune.py and the `checkpoint` teacher).
"""
import math
import os
import random
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T
from tqdm import tqdm

import common
import data
import losses
import model
from model import VIT_SIZES  # (inside Config, `model` is the field)
from common import (GE0, GE1, ConfigError, Run, ddp, shard, all_reduce_sum,
                    cosine_lr, load_optimizer, load_state, log_json, no_sync, param_groups,
                    parse_config, print0, read_weights, run_main, save_atomic, setup_distributed)

MTO_TERMS = ("spa", "e", "r")  # L_spa (Eq. 3), L_e (Eq. 4), L_r (Eq. 5)


@dataclass
class Config:
    framework: str = "distill"         # distill (DTM, a teacher) | simmim | mae (MTO paper)
    # data
    dataset: str = "fashion_mnist"     # fashion_mnist | imagefolder | cifar10 | cifar100
    data_path: str = "data"            # imagefolder: root of train/ and val/; else download dir
    subset: int = 0                    # use `subset` training images, evenly spaced (0 = all)
    img_size: int = 28                 # input side in pixels
    crop_scale_min: float = 0.2        # RandomResizedCrop scale lower bound (BEiT v2: 0.08 at 224)
    color_jitter: float = 0.4          # DTM Table 12
    num_workers: int = 2               # loader processes per GPU/process
    # student
    model: str = "vit_tiny"            # vit_micro | _mini | _tiny | _small | _base | _large
    patch_size: int = 4                # patch side in pixels
    pos_embed: str = "learned"         # learned | sincos | none
    rel_pos_bias: bool = False         # BEiT relative position bias in every block
    shared_rel_pos_bias: bool = False  # one relative position bias table shared by all blocks
    layer_scale: float = 0.1           # layer-scale init (0 = off); Table 12: 0.1 S/B, 1e-5 L
    fix_init: bool = False             # BEiT: block i's output projections / sqrt(2 (i + 1))
    drop_path: float = 0.0             # stochastic depth rate
    # masking
    mask: str = "block"                # block (BEiT) | random (MAE) | simmim (random coarse cells)
    mask_ratio: float = 0.4            # |M| = floor(r N) (simmim: ceil(r cells) cells)
    mask_min_patches: int = 16         # smallest block of the block-wise mask
    mask_patch_size: int = 32          # mask=simmim: a mask cell's side in pixels (SimMIM: 32)
    # teacher
    teacher: str = "ema"               # clip | checkpoint | ema | cnn (CLIP's offline stand-in)
    teacher_model: str = "ViT-B-16-quickgelu"  # open_clip model name (teacher=clip)
    # clip: open_clip tag or file; checkpoint: an encoder.pth; cnn: a .pth (else out_dir's cache)
    teacher_pretrained: str = "openai"
    teacher_epochs: int = 1            # teacher=cnn: supervised epochs over the training images
    ema_momentum: float = 0.996        # teacher=ema: momentum at the start (cosine schedule)
    ema_momentum_end: float = 1.0      # teacher=ema: momentum at the end
    # loss
    loss: str = "dtm"                  # dtm | dtm_kmeans | tokenwise | fixed (N/2) | downsample
    distance: str = "cosine"           # cosine | smooth_l1 | l1 | l2 (DTM Table 10)
    dtm_levels: int = 2                # L
    dtm_max_iters: int = 14            # k ~ U{1..max}
    dtm_min_morphed: int = 1           # N_m ~ N - U{0..N - min}
    # pixel reconstruction (framework simmim: L1; mae: L2), on the masked patches only
    norm_pix_loss: bool = True         # mae: per-patch normalised pixel targets (MAE's default)
    decoder_dim: int = 512             # mae decoder width (MAE ViT-B: 512)
    decoder_depth: int = 8             # mae decoder blocks (MAE ViT-B: 8)
    decoder_heads: int = 16            # mae decoder heads (MAE ViT-B: 16)
    # Masked Token Optimization: loss = L_pixel + w_spa L_spa + w_e L_e + w_r L_r (all w: 1)
    mto: bool = False                  # simmim: over the encoder blocks; mae: the decoder's
    mto_spa: float = 1.0               # weight of L_spa, Eq. 3 (0 = off: Table 3's ablation)
    mto_e: float = 1.0                 # weight of L_e, Eq. 4
    mto_r: float = 1.0                 # weight of L_r, Eq. 5
    mto_eps: float = 1e-6              # epsilon of L_e = 1 / (H^0 + eps)
    mto_printed_sign: bool = False     # L_r as printed: H rising with depth (DECISIONS.md)
    mto_spa_exclude_self: bool = False # L_spa without a token's similarity to itself (DECISIONS.md)
    # k-NN accuracy per epoch on frozen features (an accuracy-vs-epoch curve for RAUC, Eq. 6)
    eval_knn_every: int = 0            # epochs between evaluations (0 = never)
    knn_bank: int = 5000               # training images in the bank (each process holds all)
    knn_val: int = 1000                # validation images scored (sharded over processes)
    knn_k: int = 20                    # neighbours voting, weighted by exp(cosine / 0.07) (DINO)
    final_knn: bool = False            # at the end: k-NN vs random-init and raw-pixel baselines
    # optimisation
    epochs: int = 10                   # training epochs
    warmup_epochs: float = 1           # linear warm-up length (may be a fraction of an epoch)
    batch_size: int = 256              # global batch over all processes and accumulation steps
    accum_steps: int = 1               # gradient accumulation micro-steps per optimizer step
    blr: float = 1.5e-4                # MAE convention: peak lr = blr * batch_size / 256
    lr: float = 0.0                    # BEiT v2 convention: peak lr as given (> 0: blr is ignored)
    min_lr: float = 1e-6               # the cosine schedule's final lr
    lr_schedule: str = "cosine"        # cosine (to min_lr) | multistep (x lr_gamma at milestones)
    lr_milestones: List[int] = field(default_factory=list)  # multistep epochs (SimMIM: [700])
    lr_gamma: float = 0.1              # multistep: lr factor at each milestone
    weight_decay: float = 0.05         # AdamW weight decay (not on norms, biases, tokens)
    beta2: float = 0.98                # AdamW betas (0.9, beta2)
    clip_grad: float = 3.0             # max gradient norm (0 = off)
    # run
    out_dir: str = "runs/pretrain"     # the run directory (resumed when it holds a checkpoint)
    save_every: int = 1                # epochs between checkpoints (and at the end)
    keep_every: int = 0                # keep checkpoint-EPOCH.pth every this many epochs (0: no)
    log_every: int = 20                # steps between log lines (metrics reduced, signals checked)
    dist_timeout_s: int = 600          # after start-up: a collective waiting longer fails the run
    seed: int = 0                      # weights, data order, augmentation, masks, DTM levels
    device: str = "auto"               # auto | cpu | cuda
    precision: str = "auto"            # auto (bf16 where the hardware has it) | bf16 | fp32
    compile: bool = False              # torch.compile student and teacher (in1k recipes: true)

    CHOICES = {"framework": ("distill", "simmim", "mae"), "dataset": data.DATASETS,
               "model": VIT_SIZES, "pos_embed": ("learned", "sincos", "none"), "mask": data.MASKS,
               "teacher": ("clip", "checkpoint", "ema", "cnn"),
               "loss": ("dtm", "dtm_kmeans", "tokenwise", "fixed", "downsample"),
               "distance": losses.DISTANCES, "device": ("auto", "cpu", "cuda"),
               "precision": common.PRECISIONS, "lr_schedule": ("cosine", "multistep")}
    LIMITS = {"mask_ratio": (lambda r: 0 < r < 1, "in (0, 1)"),
              **{f"mto_{t}": GE0 for t in MTO_TERMS},
              **dict.fromkeys(("dtm_levels", "dtm_max_iters", "teacher_epochs", "knn_bank",
                               "knn_val", "mask_patch_size", "decoder_dim", "decoder_depth",
                               "decoder_heads"), GE1), "eval_knn_every": GE0}

    def validate(self):
        """What the tables (common.check_ranges) cannot say: keys that must agree."""
        num_patches, cell = (self.img_size // self.patch_size) ** 2, self.mask_patch_size
        problems = [
            (self.img_size % self.patch_size, f"img_size {self.img_size} must be a multiple of "
             f"patch_size {self.patch_size}"),
            (not 1 <= self.dtm_min_morphed <= num_patches, "config key 'dtm_min_morphed' must "
             f"be in [1, N = {num_patches}], got {self.dtm_min_morphed}"),
            (self.teacher == "cnn" and self.framework == "distill" and self.patch_size != 4,
             f"teacher=cnn gives one token per 4 x 4 px patch: set patch_size=4 (got "
             f"{self.patch_size})"),
            (self.mask == "simmim" and (cell % self.patch_size or self.img_size % cell),
             f"mask=simmim needs mask_patch_size ({cell}) to be a multiple of patch_size "
             f"({self.patch_size}) and to divide img_size ({self.img_size})"),
            (self.framework == "mae" and (self.rel_pos_bias or self.shared_rel_pos_bias
                                          or self.pos_embed == "none"),
             "framework=mae runs the encoder on the visible patches only: it needs pos_embed "
             "learned or sincos and no relative position bias"),
            (self.framework == "mae" and (self.decoder_dim % self.decoder_heads
                                          or self.decoder_dim % 4),
             f"decoder_dim ({self.decoder_dim}) must be divisible by decoder_heads "
             f"({self.decoder_heads}) and by 4 (sin-cos positions)"),
            (self.mto and self.framework == "distill", "mto=true needs framework=simmim or "
             "framework=mae (MTO acts on the mask tokens of a pixel-reconstruction model)"),
            (self.mto and not any(getattr(self, f"mto_{t}") for t in MTO_TERMS),
             "mto=true but mto_spa, mto_e and mto_r are all 0: switch mto off instead")]
        for failed, message in problems:
            if failed:
                raise ConfigError(message)


# -----------------------------------------------------------------------------
# Building the run: data and models

# the settings that shape the model or its data: a resume must keep them
RESUME_KEYS = ("framework", "dataset", "img_size", "model", "patch_size", "pos_embed",
               "rel_pos_bias", "shared_rel_pos_bias", "layer_scale", "teacher", "teacher_model",
               "decoder_dim", "decoder_depth", "decoder_heads")


def build_data(cfg: Config, dist, micro_batch: int):
    """-> (dataset of (image, mask, label) with per-sample seeded augmentation and mask, loader)."""
    grid = cfg.img_size // cfg.patch_size
    tf = data.pretrain_transform(cfg.img_size, cfg.crop_scale_min, cfg.color_jitter)
    base = data.build_dataset(cfg.dataset, cfg.data_path, train=True, subset=cfg.subset,
                              transform=tf)
    dataset = data.MaskedImages(base, grid, cfg.mask_ratio, cfg.mask, cfg.mask_min_patches,
                                cfg.seed, mask_cell=cfg.mask_patch_size // cfg.patch_size)
    if cfg.framework != "distill" and not 0 < dataset.num_masked < grid * grid:
        raise ConfigError(f"mask_ratio {cfg.mask_ratio} masks {dataset.num_masked} of "
                          f"{grid * grid} patches: pixel reconstruction needs some of each")
    loader = common.train_loader(dataset, micro_batch, dist, cfg.seed, cfg.num_workers)
    if len(loader) < cfg.accum_steps:
        raise ConfigError(f"the data set has {len(dataset)} images, fewer than one global batch "
                          f"({cfg.batch_size}): lower batch_size")
    print0(f"{len(dataset)} training images, {grid * grid} patches per image, "
           f"{dataset.num_masked} masked")
    return dataset, loader


def build_encoder(cfg: Config) -> model.ViT:
    return model.build_vit(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size,
                           pos_embed=cfg.pos_embed, rel_pos_bias=cfg.rel_pos_bias,
                           shared_rel_pos_bias=cfg.shared_rel_pos_bias, fix_init=cfg.fix_init,
                           layer_scale=cfg.layer_scale, drop_path=cfg.drop_path)


def build_mim(cfg: Config, encoder: model.ViT) -> torch.nn.Module:
    """framework simmim -> model.SimMIM; mae -> model.MAE with its decoder."""
    if cfg.framework == "simmim":
        return model.SimMIM(encoder)
    decoder = model.MAEDecoder(embed_dim=encoder.cfg.embed_dim, grid=encoder.cfg.grid,
                               patch_size=cfg.patch_size, decoder_dim=cfg.decoder_dim,
                               depth=cfg.decoder_depth, num_heads=cfg.decoder_heads)
    return model.MAE(encoder, decoder)


def build_teacher(cfg: Config, dist, encoder: model.ViT) -> model.Teacher:
    """The teacher of framework=distill; teacher=cnn is trained first (or read from its cache)."""
    path = cfg.teacher_pretrained
    if cfg.teacher == "cnn":
        path = path if path.endswith(".pth") else os.path.join(cfg.out_dir, "teacher_cnn.pth")
        train_cnn_teacher(cfg, dist, path)
    elif cfg.teacher == "checkpoint":
        read_weights(path, "teacher_pretrained")  # one line if unreadable
    elif cfg.teacher == "ema":
        print0("warning: teacher=ema (self-distillation) collapses in short runs, no better "
               "than random init; teacher=cnn or clip gives a teacher worth distilling")
    teacher = model.build_teacher(cfg.teacher, encoder, cfg.teacher_model, path)
    if teacher.num_patches != encoder.num_patches:
        raise ConfigError(f"the teacher gives {teacher.num_patches} tokens, the student has "
                          f"{encoder.num_patches} patches: match img_size/patch_size to it")
    return teacher


def build_models(cfg: Config, dist):
    """-> (student, teacher): DistillStudent and its teacher, or SimMIM / MAE and None."""
    encoder = build_encoder(cfg)
    if cfg.framework == "distill":
        teacher = build_teacher(cfg, dist, encoder).to(dist.device)
        student = model.DistillStudent(encoder, teacher.out_dim)
        about = f"teacher {cfg.teacher} -> {teacher.out_dim}-d targets"
    else:
        teacher, student = None, build_mim(cfg, encoder)
        where = {"simmim": "encoder", "mae": "decoder"}[cfg.framework]
        about = (f"MTO over the {where} blocks (w_spa {cfg.mto_spa}, w_e {cfg.mto_e}, "
                 f"w_r {cfg.mto_r})" if cfg.mto else "no MTO")
    millions = sum(p.numel() for p in student.parameters()) / 1e6
    print0(f"{cfg.framework} student {cfg.model}: {millions:.2f}M parameters; {about}")
    return student.to(dist.device), teacher


# -----------------------------------------------------------------------------
# The loss, the schedules, the checkpoint's state

def reconstruction_loss(cfg: Config, pred: torch.Tensor, img: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """L_pixel (MTO Eq. 1) on the masked patches of the (normalised) input: SimMIM's L1, MAE's
    MSE on pixels normalised per patch (norm_pix_loss)."""
    target = model.patchify(img, cfg.patch_size)                      # (B, N, p*p*C)
    if cfg.framework == "simmim":
        return losses.pixel_loss(pred, target, mask, "l1")
    target = losses.normalize_patches(target) if cfg.norm_pix_loss else target
    return losses.pixel_loss(pred, target, mask, "l2")


class PretrainLoss:
    """The loss of one micro-batch -> (loss, {term: value} for the log).

    distill: DTM (DTM Eqs. 1-5, or a Table 9-11 variant) between the student's tokens u and the
    teacher's v, the levels (N_m, k) drawn from (seed, step, micro-step): the same on every rank
    and after a resume. simmim / mae: L_pixel (MTO Eq. 1) + w_spa L_spa + w_e L_e + w_r L_r (MTO
    Eqs. 3-5) over the per-layer tokens X^l of the blocks that hold the mask tokens."""

    def __init__(self, cfg: Config, num_patches: int, num_masked=None):
        self.cfg, self.num_patches, self.num_masked = cfg, num_patches, num_masked  # N, |M|
        self.grid = round(math.sqrt(num_patches))
        # compile=true: DTM's merge round is compiled (dynamic shapes serve every round of every
        # level); the loss stays eager, its number of rounds changes with every (N_m, k) draw
        self.merge = (torch.compile(losses.bipartite_merge, dynamic=True) if cfg.compile
                      else losses.bipartite_merge)

    def __call__(self, net, img, mask, v, step: int, micro: int):
        if self.cfg.framework == "distill":
            u = net(img, mask)                                    # (B, N, C) online tokens
            return self.distill_loss(u, v, step, micro), {}
        return self.pixels(net, img, mask)

    def distill_loss(self, u: torch.Tensor, v: torch.Tensor, step: int, micro: int):
        """DTM (cfg.loss dtm | dtm_kmeans) or a baseline (tokenwise | fixed | downsample)."""
        cfg, N = self.cfg, self.num_patches
        if cfg.loss == "tokenwise":
            return losses.tokenwise_loss(u, v, cfg.distance)
        if cfg.loss == "downsample":
            assign = losses.downsample_assignment(self.grid, u.shape[0], u.device)
            return losses.morphed_distance(u, v, assign, ((self.grid + 1) // 2) ** 2,
                                           cfg.distance)
        if cfg.loss == "fixed":
            levels = losses.fixed_levels(N)
        else:
            rng = random.Random((cfg.seed * 1_000_003 + step) * 1009 + micro)
            levels = losses.sample_levels(N, cfg.dtm_levels, cfg.dtm_max_iters,
                                          cfg.dtm_min_morphed, rng)
        matching = "kmeans" if cfg.loss == "dtm_kmeans" else "bipartite"
        return losses.dtm_loss(u, v, levels, cfg.distance, matching=matching, merge=self.merge)

    def pixels(self, net, img, mask):
        cfg = self.cfg
        mae_args = {"num_masked": self.num_masked} if cfg.framework == "mae" else {}
        pred, hiddens = net(img, mask, return_hiddens=cfg.mto, **mae_args)  # (B, N, p*p*C); X^l
        loss = reconstruction_loss(cfg, pred, img, mask)
        terms = {"pixel": loss.detach()}
        if cfg.mto:
            mto = losses.mto_losses([h[:, 1:] for h in hiddens], mask, cfg.mto_printed_sign,
                                    cfg.mto_eps, exclude_self=cfg.mto_spa_exclude_self,
                                    num_masked=self.num_masked)
            for name in MTO_TERMS:
                w = getattr(cfg, f"mto_{name}")
                if w > 0:  # a switched-off term is still logged, never added (0 * inf is nan)
                    loss = loss + w * mto[name]
                terms[name] = mto[name].detach()
        return loss, terms


def multistep_lr(step: int, warmup: int, base_lr: float, milestones: List[int],
                 gamma: float) -> float:
    """SimMIM's ViT-B schedule: linear warm-up, then base_lr x gamma^(milestones passed)."""
    if step < warmup:
        return base_lr * step / warmup
    return base_lr * gamma ** sum(step >= m for m in milestones)


def schedules(cfg: Config, lr: float, steps_per_epoch: int):
    """Per-step lists: lr (warm-up, then cosine or multistep) and the EMA teacher's momentum
    (cosine from ema_momentum to ema_momentum_end)."""
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    milestones = [e * steps_per_epoch for e in cfg.lr_milestones]
    lr_at = [cosine_lr(s, total, warmup, lr, cfg.min_lr) if cfg.lr_schedule == "cosine"
             else multistep_lr(s, warmup, lr, milestones, cfg.lr_gamma) for s in range(total)]
    m0, m1 = cfg.ema_momentum, cfg.ema_momentum_end
    momentum_at = [m1 - (m1 - m0) * (math.cos(math.pi * s / total) + 1) / 2 for s in range(total)]
    return lr_at, momentum_at


def run_state(student, optimizer, teacher) -> dict:
    """checkpoint.pth besides the run's position: the student (+ MAE decoder), the optimizer and
    an EMA teacher's weights (the other teachers are fixed)."""
    state = {"model": student.state_dict(), "optimizer": optimizer.state_dict()}
    if isinstance(teacher, model.EMATeacher):
        state["teacher"] = teacher.encoder.state_dict()
    return state


def load_run_state(ckpt: dict, student, optimizer, teacher, path: str):
    load_state(student, ckpt["model"], path)
    load_optimizer(optimizer, ckpt["optimizer"], path)
    if isinstance(teacher, model.EMATeacher):
        load_state(teacher.encoder, ckpt["teacher"], path)


# -----------------------------------------------------------------------------
# k-NN evaluation: during pre-training (eval_knn_every) and the final comparison (final_knn)

@torch.no_grad()
def knn_features(ds, encoders: dict, cfg: "Config", dist,
                 sampler=None) -> Tuple[dict, torch.Tensor]:
    """Embed a data set with each encoder (None = raw pixels) -> ({name: (n, D)}, labels (n,)).
    An encoder gives two features: its final-normed [cls] token and the mean of its patch tokens."""
    feats, labels = {}, []
    loader = DataLoader(ds, batch_size=256, sampler=sampler, num_workers=cfg.num_workers,
                        generator=torch.Generator())  # its own: training randomness untouched
    for img, y in loader:
        img = img.to(dist.device)
        for name, enc in encoders.items():
            if enc is None:
                out = {name: img.flatten(1)}                              # (b, C*H*W)
            else:
                with common.autocast(cfg.precision, dist.device):
                    tokens = enc.eval()(img).float()                      # (b, 1+N, D)
                out = {f"{name} [cls]": tokens[:, 0], f"{name} mean": tokens[:, 1:].mean(1)}
            for key, f in out.items():
                feats.setdefault(key, []).append(f.float())
        labels.append(y.to(dist.device))
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def knn_top1(bank: torch.Tensor, bank_labels, val: torch.Tensor, val_labels, k: int,
             num_classes: int) -> float:
    """losses.knn_votes' top-1, the bank's mean subtracted (the same for every feature, so the
    comparison stays fair). Each process scores its shard; summed."""
    votes = losses.knn_votes(bank, bank_labels, val, num_classes, k, centre=True)
    correct = (votes.argmax(1) == val_labels).sum().float()
    scored = torch.tensor(float(len(val)), device=correct.device)
    counts = all_reduce_sum(torch.stack([correct, scored]))
    return (counts[0] / counts[1]).item()


def knn_eval(cfg: "Config", encoders: dict, dist, val_size: int) -> dict:
    """k-NN top-1 of every feature of `encoders`: bank = knn_bank training images, queries =
    val_size test images (0 = all), both evenly spaced over their split (every class), the
    queries sharded over the processes."""
    tf = data.eval_transform(cfg.img_size)
    bank_set = data.build_dataset(cfg.dataset, cfg.data_path, train=True, transform=tf,
                                  subset=cfg.knn_bank)
    val_set = data.build_dataset(cfg.dataset, cfg.data_path, train=False, transform=tf,
                                 subset=val_size)
    bank, bank_labels = knn_features(bank_set, encoders, cfg, dist)
    val, val_labels = knn_features(val_set, encoders, cfg, dist,
                                   sampler=shard(len(val_set), dist.rank, dist.world))
    num_classes = int(bank_labels.max()) + 1
    return {name: knn_top1(bank[name], bank_labels, val[name], val_labels, cfg.knn_k, num_classes)
            for name in bank}


def final_knn_report(cfg: "Config", encoder: model.ViT, dist, log_path: str):
    """Print and log k-NN top-1 on the whole test split: this encoder against the two baselines
    any encoder must beat, raw pixels and a random-init encoder of the same config."""
    torch.manual_seed(cfg.seed)                                   # the student's initial weights
    encoders = {"pixels": None, "random-init": build_encoder(cfg).to(dist.device),
                "trained": encoder}
    acc = knn_eval(cfg, encoders, dist, val_size=0)
    print0(f"k-NN top-1 on the test split (bank: {cfg.knn_bank} training images, k={cfg.knn_k}, "
           f"centred cosine):\n  raw pixels               {100 * acc['pixels']:5.1f}")
    best = {}
    for n in ("random-init", "trained"):
        cls, mean = acc[f"{n} [cls]"], acc[f"{n} mean"]
        best[n] = max(cls, mean)
        print0(f"  {n + ' ' + cfg.model:<24} {100 * best[n]:5.1f}   ([cls] {100 * cls:.1f}, "
               f"patch mean {100 * mean:.1f})")
    margin = [100 * (best["trained"] - acc["pixels"]),
              100 * (best["trained"] - best["random-init"])]
    print0(f"the trained encoder {'beats' if min(margin) > 0 else 'does NOT beat'} both "
           f"baselines: {margin[0]:+.1f} over raw pixels, {margin[1]:+.1f} over random init")
    if dist.main:
        log_json(log_path, {"final_knn_top1": acc})


def knn_during_training(cfg: Config, encoder: model.ViT, dist, run: Run, epochs_done: int):
    """eval_knn_every: k-NN top-1 on knn_val test images, printed and logged (for RAUC)."""
    if not cfg.eval_knn_every or (epochs_done % cfg.eval_knn_every and epochs_done < cfg.epochs):
        return
    acc = knn_eval(cfg, {"encoder": encoder}, dist, cfg.knn_val)
    print0(f"epoch {epochs_done}: k-NN top-1 {acc['encoder mean']:.4f} (patch mean), "
           f"{acc['encoder [cls]']:.4f} ([cls])")
    if dist.main:
        log_json(run.log_path, {"epoch": epochs_done, "knn_top1": acc["encoder mean"],
                                "knn_top1_cls": acc["encoder [cls]"]})


# -----------------------------------------------------------------------------
# teacher=cnn: a small supervised CNN, trained once and cached, stands in for CLIP offline

def train_cnn_teacher(cfg: "Config", dist, path: str):
    """Train model.SmallCNN with labels on the training images (flips only) and save it to
    `path`; skipped when `path` exists. Rank 0 trains, the others wait and load the file."""
    if os.path.isfile(path):
        print0(f"teacher=cnn: using the trained CNN in {path}")
        return
    if dist.main:
        torch.manual_seed(cfg.seed)
        tf = T.Compose([T.RandomHorizontalFlip(), data.eval_transform(cfg.img_size)])
        train_set = data.build_dataset(cfg.dataset, cfg.data_path, train=True, transform=tf,
                                       subset=cfg.subset)
        test_set = data.build_dataset(cfg.dataset, cfg.data_path, train=False,
                                      transform=data.eval_transform(cfg.img_size))
        num_classes = len(test_set.classes)
        cnn = model.SmallCNN(num_classes).to(dist.device)
        opt = torch.optim.AdamW(cnn.parameters(), lr=2e-3, weight_decay=0.05)
        loader = DataLoader(train_set, batch_size=128, shuffle=True, drop_last=True,
                            num_workers=cfg.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed))
        total = cfg.teacher_epochs * len(loader)
        print0(f"teacher=cnn: training a small CNN with labels for {cfg.teacher_epochs} epoch(s) "
               f"({len(train_set)} images), a stand-in for CLIP (which needs a download)")
        batches = (b for _ in range(cfg.teacher_epochs) for b in loader)
        for step, (img, y) in enumerate(tqdm(batches, total=total, desc="teacher")):
            opt.param_groups[0]["lr"] = cosine_lr(step, total, 0, 2e-3, 1e-5)
            loss = F.cross_entropy(cnn.classify(img.to(dist.device)), y.to(dist.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        cnn.eval()
        with torch.no_grad():
            hits = [(cnn.classify(x.to(dist.device)).argmax(1).cpu() == y).sum()
                    for x, y in DataLoader(test_set, batch_size=512)]
        top1 = 100 * sum(hits).item() / len(test_set)
        print0(f"teacher=cnn: test top-1 {top1:.1f}%; saved {path}")
        save_atomic({"num_classes": num_classes, "width": cnn.width, "test_top1": top1,
                     "epochs": cfg.teacher_epochs, "images": len(train_set),
                     "model": cnn.cpu().state_dict()}, path)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# -----------------------------------------------------------------------------
# The training loop

def main(argv):
    cfg = parse_config(Config, argv)
    dist = setup_distributed(cfg.device, cfg.dist_timeout_s)
    run = Run(cfg, dist, RESUME_KEYS)  # out_dir locked, config checked
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    dataset, loader = build_data(cfg, dist, run.micro_batch)
    student, teacher = build_models(cfg, dist)  # teacher: None for simmim / mae
    loss_fn = PretrainLoss(cfg, student.encoder.num_patches, dataset.num_masked)
    lr = cfg.lr if cfg.lr > 0 else cfg.blr * cfg.batch_size / 256  # BEiT v2 (DTM) | MAE, SimMIM
    print0(f"peak lr {lr:.3g} " + ("(lr, as given: BEiT v2 convention)" if cfg.lr > 0 else
           f"(blr {cfg.blr:g} x batch {cfg.batch_size} / 256: MAE convention)"))
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=lr,
                                  betas=(0.9, cfg.beta2), fused=dist.device.type == "cuda")
    steps_per_epoch = len(loader) // cfg.accum_steps
    run.resume(steps_per_epoch, lambda ckpt: load_run_state(ckpt, student, optimizer, teacher,
                                                            run.ckpt_path),
               lambda: run_state(student, optimizer, teacher))
    encoder_file = lambda: {run.path("encoder.pth"): model.encoder_state(student.encoder)}  # noqa
    lr_at, momentum_at = schedules(cfg, lr, steps_per_epoch)
    net = ddp(student, dist, compile=cfg.compile)  # what the loop calls: DDP, then compile
    # the teacher's forward, compiled like the student
    teacher_forward = torch.compile(teacher) if cfg.compile and teacher is not None else teacher
    autocast = common.autocast(cfg.precision, dist.device)  # bf16 where native (precision)
    print0(f"{steps_per_epoch} steps per epoch, "
           f"{common.resolve_precision(cfg.precision, dist.device)} autocast")

    for epoch in run.epochs():
        batches = common.on_device(run.epoch_batches(epoch, loader), dist.device)
        net.train()
        for step in run.steps(epoch):  # a progress bar; log, stop signal: `run`
            run.set_lr(optimizer, lr_at[step])
            logged = {}                                           # this step's loss terms
            for micro in range(cfg.accum_steps):
                img, mask, _ = next(batches)        # on the device: uint8 (B, C, H, W), (B, N)
                img = data.normalize(img)                             # float32 model input
                v = teacher_forward(img) if teacher is not None else None  # (B, N, C) targets
                with autocast, no_sync(net, micro, cfg.accum_steps):
                    loss, terms = loss_fn(net, img, mask, v, step, micro)
                    (loss / cfg.accum_steps).backward()
                for name, value in {"loss": loss.detach(), **terms}.items():
                    logged[name] = logged.get(name, 0) + value
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            optimizer.step()
            if isinstance(teacher, model.EMATeacher):
                teacher.update(student.encoder, momentum_at[step])
            run.add(logged, n=cfg.accum_steps)
            optimizer.zero_grad(set_to_none=True)
        run.end_epoch(epoch)  # stopped by a signal mid-epoch: save and exit
        done = epoch + 1
        knn_during_training(cfg, student.encoder, dist, run, done)
        if done % cfg.save_every == 0 or done == cfg.epochs or run.stopping:
            run.save(done, encoder_file(), keep=bool(cfg.keep_every) and done % cfg.keep_every == 0)
        run.exit_if_stopped(done)
    if cfg.final_knn:
        final_knn_report(cfg, student.encoder, dist, run.log_path)
    print0(f"done: {cfg.out_dir}/encoder.pth")


if __name__ == "__main__":
    run_main(main)
