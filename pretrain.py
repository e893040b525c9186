"""Masked image modeling pre-training: distill a teacher into a ViT with Dynamic Token Morphing.

    # the default: a small ViT on Fashion-MNIST, EMA teacher, 2-core CPU, a few minutes
    python pretrain.py --config configs/fmnist_dtm.yaml
    # one node, 8 GPUs, the DTM paper's ViT-B/16 recipe with a CLIP ViT-B/16 teacher
    torchrun --nproc_per_node=8 pretrain.py --config configs/in1k_vit_base_dtm.yaml data_path=/data/imagenet
    # several nodes: the same command on each node, plus --nnodes, --node_rank, --master_addr
    torchrun --nnodes=4 --node_rank=$RANK --master_addr=$HOST --nproc_per_node=8 pretrain.py --config ...

Per step: the teacher sees the full image and gives target tokens v (B, N, C); the student sees
the same view with masked patches replaced by e_[M] and gives u = h(f(x^M)) (B, N, C); the loss
morphs both with the morphing computed from v and compares them (losses.dtm_loss, Eqs. 1-5).
A run directory holds config.yaml, log.jsonl, checkpoint.pth (resumed automatically) and
encoder.pth (the encoder alone, for probe.py, finetune.py and the `checkpoint` teacher).
"""
import contextlib
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
import losses
import model as M
from common import (ConfigError, NonFiniteLoss, all_reduce_mean, check_choice, config_dict, cosine_lr,
                    load_checkpoint, log_json, param_groups, parse_config, print0, run_main, save_atomic,
                    setup_distributed, split_batch)


@dataclass
class Config:
    # data
    dataset: str = "fashion_mnist"     # fashion_mnist | imagefolder | cifar10 | cifar100
    data_path: str = "data"            # imagefolder: root with train/ (and val/); others: download dir
    subset: int = 0                    # use only the first `subset` training images (0 = all)
    img_size: int = 28                 # input side in pixels
    crop_scale_min: float = 0.2        # RandomResizedCrop scale lower bound (BEiT v2: 0.08 at 224)
    color_jitter: float = 0.4          # DTM Table 12
    num_workers: int = 2               # loader processes per GPU/process
    # student
    model: str = "vit_tiny"            # vit_micro | vit_tiny | vit_small | vit_base | vit_large
    patch_size: int = 4
    pos_embed: str = "learned"         # learned | sincos | none
    rel_pos_bias: bool = False         # BEiT relative position bias in every block
    shared_rel_pos_bias: bool = False  # one relative position bias table shared by all blocks
    layer_scale: float = 0.1           # layer-scale init (0 = off); Table 12: 0.1 S/B, 1e-5 L
    drop_path: float = 0.0
    # masking
    mask: str = "block"                # block (BEiT) | random (MAE)
    mask_ratio: float = 0.4            # |M| = floor(r N); DTM: 75 of 196 patches
    mask_min_patches: int = 16         # smallest block of the block-wise mask
    # teacher
    teacher: str = "ema"               # clip | checkpoint | ema
    teacher_model: str = "ViT-B-16-quickgelu"  # open_clip model name (teacher=clip)
    teacher_pretrained: str = "openai" # open_clip tag or local weights file; encoder.pth for checkpoint
    ema_momentum: float = 0.996        # teacher=ema: momentum at the start, cosine-increased to ...
    ema_momentum_end: float = 1.0      # ... this at the end
    # loss
    loss: str = "dtm"                  # dtm | tokenwise | fixed (morph to N/2) | downsample (2x2)
    distance: str = "cosine"           # cosine | smooth_l1 | l1 | l2 (DTM Table 10)
    dtm_levels: int = 2                # L
    dtm_max_iters: int = 14            # k ~ U{1..max}
    dtm_min_morphed: int = 1           # N_m ~ N - U{0..N - min}
    # optimisation
    epochs: int = 10
    warmup_epochs: int = 1
    batch_size: int = 256              # global batch over all processes and accumulation steps
    accum_steps: int = 1               # gradient accumulation micro-steps per optimizer step
    blr: float = 1.5e-4                # lr = blr * batch_size / 256
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    beta2: float = 0.98                # AdamW betas (0.9, beta2)
    clip_grad: float = 3.0             # max gradient norm (0 = off)
    # run
    out_dir: str = "runs/pretrain"
    save_every: int = 1                # epochs between checkpoints (and at the end)
    keep_every: int = 0                # also keep checkpoint-EPOCH.pth every this many epochs (0 = never)
    log_every: int = 20                # optimizer steps between log lines (metrics reduced then)
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda
    compile: bool = False              # torch.compile the student

    def validate(self):
        check_choice("dataset", self.dataset, data.DATASETS)
        check_choice("model", self.model, M.VIT_SIZES)
        check_choice("pos_embed", self.pos_embed, ("learned", "sincos", "none"))
        check_choice("mask", self.mask, ("block", "random"))
        check_choice("teacher", self.teacher, ("clip", "checkpoint", "ema"))
        check_choice("loss", self.loss, ("dtm", "tokenwise", "fixed", "downsample"))
        check_choice("distance", self.distance, losses.DISTANCES)
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"config key 'mask_ratio' must be in (0, 1), got {self.mask_ratio}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}")
        num_patches = (self.img_size // self.patch_size) ** 2
        if not 1 <= self.dtm_min_morphed <= num_patches:
            raise ConfigError(f"config key 'dtm_min_morphed' must be in [1, N = {num_patches}], "
                              f"got {self.dtm_min_morphed}")
        for key in ("epochs", "batch_size", "accum_steps", "dtm_levels", "dtm_max_iters", "log_every", "save_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")


def main(argv):
    cfg = parse_config(Config, argv)
    dist = setup_distributed(cfg.device)
    micro_batch = split_batch(cfg.batch_size, dist.world, cfg.accum_steps)
    print0(yaml.safe_dump(config_dict(cfg), sort_keys=False))
    print0(f"world size {dist.world}, micro-batch {micro_batch} per process, "
           f"{cfg.accum_steps} accumulation step(s), global batch {cfg.batch_size}")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (the EMA teacher copies them)
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pth")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if dist.main:
        with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_dict(cfg), f, sort_keys=False)

    # -------------------------------------------------------------------------
    # Data: (image, mask, label) with per-sample seeded augmentation and mask
    grid = cfg.img_size // cfg.patch_size
    num_patches = grid * grid
    base = data.build_dataset(cfg.dataset, cfg.data_path, train=True, subset=cfg.subset,
                              transform=data.pretrain_transform(cfg.img_size, cfg.crop_scale_min, cfg.color_jitter))
    dataset = data.MaskedImages(base, grid, cfg.mask_ratio, cfg.mask, cfg.mask_min_patches, cfg.seed)
    sampler = DistributedSampler(dataset, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=micro_batch, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=dist.device.type == "cuda", drop_last=True)
    steps_per_epoch = len(loader) // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"the data set has {len(dataset)} images, fewer than one global batch "
                          f"({cfg.batch_size}): lower batch_size")
    print0(f"{len(dataset)} training images, {num_patches} patches per image, "
           f"{dataset.num_masked} masked, {steps_per_epoch} steps per epoch")

    # -------------------------------------------------------------------------
    # Student, teacher, optimizer
    encoder = M.build_vit(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size, pos_embed=cfg.pos_embed,
                          rel_pos_bias=cfg.rel_pos_bias, shared_rel_pos_bias=cfg.shared_rel_pos_bias,
                          layer_scale=cfg.layer_scale, drop_path=cfg.drop_path)
    teacher = M.build_teacher(cfg.teacher, encoder, cfg.teacher_model, cfg.teacher_pretrained)
    if teacher.num_patches != num_patches:
        raise ConfigError(f"the teacher gives {teacher.num_patches} tokens but the student has {num_patches} "
                          "patches: match img_size/patch_size to the teacher's")
    student = M.DistillStudent(encoder, teacher.out_dim).to(dist.device)
    teacher = teacher.to(dist.device)
    print0(f"student {cfg.model}: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters; "
           f"teacher {cfg.teacher} -> {teacher.out_dim}-d targets")
    lr = cfg.blr * cfg.batch_size / 256
    optimizer = torch.optim.AdamW(param_groups(student, cfg.weight_decay), lr=lr, betas=(0.9, cfg.beta2),
                                  fused=dist.device.type == "cuda")

    start_epoch, step = 0, 0
    if os.path.isfile(ckpt_path):  # auto-resume
        ckpt = load_checkpoint(ckpt_path)
        student.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        if "teacher" in ckpt:
            teacher.encoder.load_state_dict(ckpt["teacher"], strict=True)
        start_epoch, step = ckpt["epoch"], ckpt["step"]
        print0(f"resumed from {ckpt_path} at epoch {start_epoch}, step {step}")
        del ckpt

    torch.manual_seed(cfg.seed + dist.rank)  # from here on, per-rank randomness (drop path)
    model = student
    if cfg.compile:
        model = torch.compile(model)
    if dist.world > 1:
        model = DDP(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)

    def loss_fn(u, v, step, micro):
        if cfg.loss == "tokenwise":
            return losses.tokenwise_loss(u, v, cfg.distance)
        if cfg.loss == "downsample":
            assign = losses.downsample_assignment(grid, u.shape[0], u.device)
            return losses.morphed_distance(u, v, assign, ((grid + 1) // 2) ** 2, cfg.distance)
        if cfg.loss == "fixed":
            levels = losses.fixed_levels(num_patches)
        else:  # same levels on every rank: the rng depends only on (seed, step, micro-step)
            rng = random.Random((cfg.seed * 1_000_003 + step) * 1009 + micro)
            levels = losses.sample_levels(num_patches, cfg.dtm_levels, cfg.dtm_max_iters, cfg.dtm_min_morphed, rng)
        return losses.dtm_loss(u, v, levels, cfg.distance)

    # -------------------------------------------------------------------------
    # Training loop
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dist.device.type == "cuda")
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        model.train()
        loss_sum = torch.zeros((), device=dist.device)
        loss_count, t0 = 0, time.time()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not dist.main,
                   dynamic_ncols=True)
        it = iter(loader)
        for _ in range(steps_per_epoch):
            lr_now = cosine_lr(step, total_steps, warmup_steps, lr, cfg.min_lr)
            for g in optimizer.param_groups:
                g["lr"] = lr_now
            for micro in range(cfg.accum_steps):
                img, mask, _ = next(it)
                img = img.to(dist.device, non_blocking=True)
                mask = mask.to(dist.device, non_blocking=True)
                v = teacher(img)                                  # (B, N, C) targets, full image
                sync = micro == cfg.accum_steps - 1 or dist.world == 1
                with autocast, (contextlib.nullcontext() if sync else model.no_sync()):
                    u = model(img, mask)                          # (B, N, C) online tokens
                    loss = loss_fn(u, v, step, micro)
                    (loss / cfg.accum_steps).backward()
                loss_sum += loss.detach()
                loss_count += 1
            if cfg.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.teacher == "ema":
                m = cfg.ema_momentum_end - (cfg.ema_momentum_end - cfg.ema_momentum) * \
                    (math.cos(math.pi * step / total_steps) + 1) / 2
                teacher.update(student.encoder, m)
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step % steps_per_epoch == 0:
                mean_loss = all_reduce_mean(loss_sum / loss_count).item()  # the only host sync
                if not math.isfinite(mean_loss):
                    raise NonFiniteLoss(f"loss is {mean_loss} at step {step} (epoch {epoch + 1}); "
                                        f"the last good checkpoint is {ckpt_path}: lower blr or check the data")
                ips = loss_count * micro_batch * dist.world / (time.time() - t0)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}", img_s=f"{ips:.0f}")
                if dist.main:
                    log_json(log_path, {"epoch": epoch + 1, "step": step, "loss": mean_loss, "lr": lr_now,
                                        "img_per_s": ips})
                loss_sum.zero_()
                loss_count, t0 = 0, time.time()
        bar.close()

        # ---------------------------------------------------------------------
        # Checkpoint: the unwrapped student, optimizer, teacher (ema), position in the run
        done = epoch + 1
        if dist.main and (done % cfg.save_every == 0 or done == cfg.epochs):
            state = {"model": student.state_dict(), "optimizer": optimizer.state_dict(), "epoch": done,
                     "step": step, "config": config_dict(cfg)}
            if cfg.teacher == "ema":
                state["teacher"] = teacher.encoder.state_dict()
            save_atomic(state, ckpt_path)
            if cfg.keep_every and done % cfg.keep_every == 0:
                save_atomic(state, os.path.join(cfg.out_dir, f"checkpoint-{done:04d}.pth"))
            save_atomic(M.encoder_state(student.encoder), os.path.join(cfg.out_dir, "encoder.pth"))
            print0(f"saved {ckpt_path} and encoder.pth after epoch {done}")
    print0(f"done: {cfg.out_dir}/encoder.pth")


if __name__ == "__main__":
    run_main(main)
