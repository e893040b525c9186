"""Speed of the pre-training step: variants side by side, all timed in one process.

    python bench.py --device cpu               # tiny models, a few minutes on 2 cores
    python bench.py --device cuda              # ViT-S/B/L at 224 px, bf16, batch 256 (ViT-L 128);
                                               # the distill step at the recipe's 128 per GPU
    python bench.py --device cuda --data jpeg  # + the step fed from JPEGs decoded from a folder
    python bench.py --device cuda --sections distill --profile   # where the time of one step goes
    python bench.py --device cpu --sections precision  # the default job's step, fp32 vs bf16
    python bench.py --device cpu --sections loader     # one loader worker, before vs after
    python bench.py --device cuda --models vit_base --batch 128 --no-compile drop_path=0.1
                                               # (trailing key=value pairs override the Config)

Sections (rows). Every ratio compares variants timed in turn, one step each, in this run, so a
busy machine slows both sides alike:
  step     this project's ViT vs timm's VisionTransformer: same size, batch, precision and weights,
           eager and torch.compile; a step is forward, backward, gradient clipping and AdamW
  relpos   our ViT's step without BEiT's relative position bias, with a shared table, a table
           per block, and both (the DTM recipes): what each costs
  distill  pretrain.py's step: frozen CLIP-sized teacher + student + loss, token-wise vs DTM
           (L levels, k <= max_iters, drawn per step), same student, teacher and optimizer
  dtm      the DTM assignment alone (ms per batch) for N = 196 tokens and several (N_m, k); and
           the loss alone (forward + backward), token-wise vs DTM: DTM's cost without step noise
  precision  pretrain.py's step with the config's own teacher and batch, fp32 vs bf16 autocast
           (the `precision` key), and the attention alone in bf16, fused kernel vs explicit
  data     the distill step fed from decoded JPEGs (DataLoader workers, pretrain.py's transform
           and masks) vs from tensors already on the device, and the loader alone (--data jpeg)
  loader   one worker's time per sample on ImageNet-sized JPEGs with the ImageNet recipe's
           augmentation, before (jitter on the whole image, float32) and after (crop first, uint8)
  stalls   counts, not times: device -> host reads per MAE + MTO step, buffers DDP copies before
           each forward, ops of one EMA teacher update

Student, masking, loss and AdamW settings come from a pre-training config (pretrain.Config:
--config, then key=value overrides). The teacher is open_clip's visual tower with RANDOM weights
(no download): timing only. FLOPs are counted analytically (vit_forward_flops); MFU =
(3 x student forward + teacher forward FLOPs) x images/s / the device's dense bf16 peak.
"""
import argparse
import json
import math
import multiprocessing
import os
import random
import resource
import statistics
import sys
import tempfile
import time

import torch
from torch.profiler import record_function

import common
import data
import losses
import model as M
import pretrain
from common import param_groups, parse_config

# Dense bf16 peak, TFLOP/s, of the devices we know (most specific names first); else --peak-tflops.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}
GPU_MODELS = "vit_small,vit_base,vit_large"  # the step section's default sizes on a GPU
GPU_BATCH, GPU_BATCH_LARGE, CPU_BATCH = 256, 128, 16
RECIPE_GPU_BATCH = 128  # distill, dtm, data sections on a GPU: the recipes' 1024 over 8 GPUs
DTM_CASES = [(196, 1), (147, 2), (98, 1), (98, 7), (98, 14), (49, 14), (1, 1), (1, 14)]  # (N_m, k)
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
TINY_CLIP = "bench-tiny-clip"  # the CPU teacher: an open_clip config registered at start-up
SECTIONS = ("step", "relpos", "distill", "dtm", "data", "precision", "loader", "stalls")
# profiler scopes of a step
PHASES = ("teacher", "student forward", "loss", "backward", "clip+adamw")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", help="pre-training config (default: configs/in1k_vit_base_dtm.yaml "
                                    "on cuda, configs/fmnist_dtm.yaml on cpu)")
    p.add_argument("--models", help=f"step section, comma-separated (default: cuda {GPU_MODELS}; "
                                    "cpu the config's model)")
    p.add_argument("--batch", type=int, default=0,
                   help=f"batch per step (default: cuda {GPU_BATCH}, ViT-L {GPU_BATCH_LARGE}, "
                        f"distill/dtm/data {RECIPE_GPU_BATCH}; "
                        f"cpu {CPU_BATCH})")
    p.add_argument("--teacher", help="open_clip model name (default: cuda the config's "
                                     f"teacher_model; cpu {TINY_CLIP}, a ViT-Tiny-like tower)")
    p.add_argument("--precision", choices=("bf16", "fp32"),
                   help="autocast dtype of the student (default: bf16 on cuda, fp32 on cpu, "
                        "as pretrain.py)")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps per variant (default: cuda 20, cpu 10)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed steps per variant (default: cuda 5, cpu 2)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile rows")
    p.add_argument("--eager-teacher", dest="compile_teacher", action="store_false",
                   help="the compiled distill rows keep the teacher eager (pretrain.py with "
                        "compile=true compiles both)")
    p.add_argument("--sections", default="step,relpos,distill,dtm,loader,stalls",
                   help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--data", choices=("tensor", "jpeg"), default="tensor",
                   help="jpeg: also run the data section (the same as adding it to --sections)")
    p.add_argument("--jpeg-dir", default="",
                   help="image folder to use, filled if short (default: a temporary one)")
    p.add_argument("--jpeg-count", type=int, default=0,
                   help="JPEGs to generate (default: cuda 4000, cpu 200)")
    p.add_argument("--workers", type=int, default=-1,
                   help="DataLoader workers, also JPEG writers (default: CPU cores - 2)")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="dense bf16 peak of this device, TFLOP/s")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler tables of the eager distill steps")
    p.add_argument("--json", default="", help="also write the rows and targets to this file")
    p.add_argument("overrides", nargs="*", help="key=value overrides of pretrain.Config")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    default_config = "configs/in1k_vit_base_dtm.yaml" if gpu else "configs/fmnist_dtm.yaml"
    args.config = args.config or default_config
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.steps = args.steps or (20 if gpu else 10)
    args.warmup = args.warmup or (5 if gpu else 2)
    args.jpeg_count = args.jpeg_count or (4000 if gpu else 200)
    if args.workers < 0:
        args.workers = max(1, len(os.sched_getaffinity(0)) - 2)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {sorted(unknown)}: choose from {', '.join(SECTIONS)}")
    if args.data == "jpeg" and "data" not in args.sections:
        args.sections.append("data")
    return args


def batch_for(args, name):
    if args.batch:
        return args.batch
    if args.device != "cuda":
        return CPU_BATCH
    return GPU_BATCH_LARGE if name == "vit_large" else GPU_BATCH


# -----------------------------------------------------------------------------
# FLOPs, timing, memory

def vit_forward_flops(depth, dim, num_patches, patch_size, out_dim=0, mlp_ratio=4.0, in_chans=3):
    """Forward FLOPs per image of a ViT with T = 1 + N tokens (a multiply-add is 2 FLOPs):

        depth * T * (24 D^2 + 4 T D)   per block and token: qkv 6 D^2, proj 2 D^2, MLP 16 D^2
                                       (ratio 4); q k^T 2 T D, attention @ v 2 T D
      + N * 2 * (3 p^2) * D            patch embedding
      + N * 2 * D * C                  linear head / projection to C-d targets (if out_dim)
    Norms, softmax, GELU, the loss and the optimizer are not counted.
    """
    assert mlp_ratio == 4.0, "the 24 D^2 term assumes an MLP ratio of 4"
    T = 1 + num_patches
    blocks = depth * T * (24 * dim ** 2 + 4 * T * dim)
    patch_embed = num_patches * 2 * in_chans * patch_size ** 2 * dim
    head = num_patches * 2 * dim * out_dim
    return blocks + patch_embed + head


def device_peak_flops(args):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, device, warmup, steps):
    """Warm every variant up, then run `steps` rounds of one step of each variant in turn, each
    step bracketed by device synchronisations. Returns {name: [seconds, ...]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def step_peak_bytes(fn, device, resident):
    """Peak memory of one step of `fn` alone: what it allocates on top of what was there, plus
    the bytes of the modules and optimizer states it keeps (`resident`). None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before + resident


def state_bytes(*objs):
    """Bytes held by modules (parameters, buffers) and optimizers (their state tensors)."""
    seen, total = set(), 0
    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        else:
            tensors = [t for s in obj.state.values() for t in s.values() if torch.is_tensor(t)]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def row(section, variant, batch, seconds, ref=None, vs=None, flops_per_image=None, peak=None,
        mem=None):
    """A table row from per-step times: median ms, images/s, spread (half the interquartile range
    over the median), MFU. `ratio` (against the row named `ref`, shown as `vs`) is filled in
    later."""
    med = statistics.median(seconds)
    q = statistics.quantiles(seconds, n=4) if len(seconds) > 1 else [med] * 3
    ips = batch / med if batch else None
    return {"section": section, "variant": variant, "batch": batch, "ms": 1e3 * med,
            "images_s": ips,
            "spread": (q[2] - q[0]) / 2 / med, "seconds": list(seconds), "ref": ref, "vs": vs,
            "ratio": None, "ratio_spread": None,
            "mfu": flops_per_image * ips / peak if (flops_per_image and peak and ips) else None,
            "peak_gib": mem / 2 ** 30 if mem is not None else None}


# -----------------------------------------------------------------------------
# Models and one training step

def build_pair(name, cfg, device):
    """Our ViT and timm's VisionTransformer of the same size, holding the same weights."""
    from timm.models.vision_transformer import VisionTransformer
    ours = M.build_vit(name, img_size=cfg.img_size, patch_size=cfg.patch_size,
                       layer_scale=cfg.layer_scale)
    size = M.VIT_SIZES[name]
    ref = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0,
                            global_pool="token", embed_dim=size["embed_dim"], depth=size["depth"],
                            num_heads=size["num_heads"], init_values=cfg.layer_scale or None)
    # the same network, parameter by parameter
    ref.load_state_dict(M.to_timm(ours.state_dict()), strict=True)
    return ours.to(device), ref.to(device)


def random_clip_teacher(name):
    """CLIPTeacher over open_clip's `name` with random weights, loaded through the real path
    (a file)."""
    import open_clip
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "random_clip.pt")
        torch.save(open_clip.create_model(name, device="cpu").state_dict(), path)
        return M.CLIPTeacher(name, pretrained=path)


def register_tiny_clip(cfg, folder):
    """The CPU teacher: a ViT-Tiny-like open_clip tower (width 192, 6 blocks) at the config's
    size."""
    import open_clip
    spec = {"embed_dim": 64, "quick_gelu": True,
            "vision_cfg": {"image_size": cfg.img_size, "patch_size": cfg.patch_size, "width": 192,
                           "layers": 6, "head_width": 64},
            "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2,
                         "layers": 1}}
    path = os.path.join(folder, f"{TINY_CLIP}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    open_clip.add_model_config(path)


def make_optimizer(module, cfg, device):
    return torch.optim.AdamW(param_groups(module, cfg.weight_decay), lr=cfg.blr,
                             betas=(0.9, cfg.beta2), fused=device.type == "cuda")


def train_step(loss_of, params, optimizer, autocast, clip_grad):
    """loss_of() under autocast, then backward, gradient clipping and AdamW, as in pretrain.py."""
    with autocast:
        loss = loss_of()
    with record_function("backward"):
        loss.backward()
    with record_function("clip+adamw"):
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def make_loss(cfg, kind, num_patches):
    """pretrain.py's loss: token-wise, or DTM with levels drawn per step from a seeded rng."""
    if kind == "tokenwise":
        return lambda u, v: losses.tokenwise_loss(u, v, cfg.distance)
    rng = random.Random(cfg.seed)  # every DTM variant sees the same sequence of levels

    def dtm(u, v):
        levels = losses.sample_levels(num_patches, cfg.dtm_levels, cfg.dtm_max_iters,
                                      cfg.dtm_min_morphed, rng)
        return losses.dtm_loss(u, v, levels, cfg.distance)
    return dtm


def batch_of_masks(cfg, batch, seed=0):
    """(B, N) bool masks as pretrain.py's data set draws them."""
    grid = cfg.img_size // cfg.patch_size
    num_masked = data.num_masked_patches(grid * grid, cfg.mask_ratio)
    rng = random.Random(seed)

    def one():
        if cfg.mask == "block":
            return data.block_mask(grid, num_masked, cfg.mask_min_patches, rng=rng)
        return data.random_mask(1, grid * grid, num_masked)[0]
    return torch.stack([one() for _ in range(batch)])


# -----------------------------------------------------------------------------
# Section: our ViT vs timm's

def bench_step(args, cfg, device, autocast, peak):
    rows = []
    names = (args.models or (GPU_MODELS if args.device == "cuda" else cfg.model)).split(",")
    for name in names:
        batch = batch_for(args, name)
        ours, ref = build_pair(name, cfg, device)
        x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
        fns, kept = {}, {}
        for who, module, forward in (("ours", ours, ours), ("timm", ref, ref.forward_features)):
            opt = make_optimizer(module, cfg, device)
            params = list(module.parameters())
            modes = [("eager", forward)]
            if args.compile:
                modes.append(("compiled", torch.compile(forward)))
            for mode, f in modes:  # eager and compiled share the module and its optimizer
                fns[f"{who} {mode}"] = lambda f=f, params=params, opt=opt: train_step(
                    lambda: f(x).float().square().mean(), params, opt, autocast, cfg.clip_grad)
                kept[f"{who} {mode}"] = (module, opt)
        print(f"  step {name}: batch {batch}, {list(fns)} ...", flush=True)
        times = time_interleaved(fns, device, args.warmup, args.steps)
        # AdamW's state exists by now
        resident = {key: state_bytes(*objs) for key, objs in kept.items()}
        c = ours.cfg
        flops = 3 * vit_forward_flops(c.depth, c.embed_dim, c.num_patches, c.patch_size)
        for key, fn in fns.items():
            mode = key.split()[1]
            rows.append(row("step", f"{name} {key}", batch, times[key], f"{name} timm {mode}",
                            f"timm {mode}", flops, peak,
                            step_peak_bytes(fn, device, resident[key])))
        del ours, ref, fns, kept, x
        free(device)
    return rows


RELPOS = {"no bias": (False, False), "shared table": (False, True),
          "per-block tables": (True, False), "both (the DTM recipes)": (True, True)}


def bench_relpos(args, cfg, device, autocast):
    """What BEiT's relative position bias costs: our ViT's training step (the config's model,
    layer scale and batch) without it, with one shared table, one table per block, and both
    (DTM App. D). With a bias, attention takes a float mask that needs a gradient, which rules
    out the flash kernel on a GPU."""
    name = (args.models or cfg.model).split(",")[0]
    batch = batch_for(args, name)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    fns = {}
    for label, (per_block, shared) in RELPOS.items():
        torch.manual_seed(cfg.seed)
        vit = M.build_vit(name, img_size=cfg.img_size, patch_size=cfg.patch_size,
                          layer_scale=cfg.layer_scale, rel_pos_bias=per_block,
                          shared_rel_pos_bias=shared, pos_embed="none" if per_block or shared
                          else "learned").to(device)
        opt = make_optimizer(vit, cfg, device)
        forward = torch.compile(vit) if args.compile else vit
        fns[label] = lambda f=forward, v=vit, opt=opt: train_step(
            lambda: f(x).float().square().mean(), list(v.parameters()), opt, autocast,
            cfg.clip_grad)
    mode = "compiled" if args.compile else "eager"
    print(f"  relpos {name} {mode}: batch {batch}, {list(fns)} ...", flush=True)
    times = time_interleaved(fns, device, args.warmup, args.steps)
    ref = f"{name} {mode} no bias"
    return [row("relpos", f"{name} {mode} {label}", batch, t, ref=ref, vs="no bias")
            for label, t in times.items()]


# -----------------------------------------------------------------------------
# Section: the distillation step, token-wise vs DTM

def build_distill(args, cfg, device):
    """pretrain.py's student and (random-weight) CLIP teacher for this config, AdamW, FLOPs per
    image."""
    teacher_name = args.teacher or (cfg.teacher_model if args.device == "cuda" else TINY_CLIP)
    teacher = random_clip_teacher(teacher_name).to(device)
    encoder = M.build_vit(cfg.model, img_size=cfg.img_size, patch_size=cfg.patch_size,
                          pos_embed=cfg.pos_embed, rel_pos_bias=cfg.rel_pos_bias,
                          shared_rel_pos_bias=cfg.shared_rel_pos_bias,
                          layer_scale=cfg.layer_scale, drop_path=cfg.drop_path)
    if teacher.num_patches != encoder.num_patches:
        raise SystemExit(f"error: teacher {teacher_name} gives {teacher.num_patches} tokens, the "
                         f"student has {encoder.num_patches} patches: match img_size/patch_size")
    student = M.DistillStudent(encoder, teacher.out_dim).to(device)
    opt = make_optimizer(student, cfg, device)
    e, v = encoder.cfg, teacher.visual
    student_flops = vit_forward_flops(e.depth, e.embed_dim, e.num_patches, e.patch_size,
                                      teacher.out_dim)
    teacher_flops = vit_forward_flops(len(v.transformer.resblocks), v.transformer.width,
                                      teacher.num_patches, v.conv1.kernel_size[0], teacher.out_dim)
    flops = 3 * student_flops + teacher_flops
    return teacher_name, teacher, student, opt, flops


def distill_steps(args, cfg, autocast, student, teacher, opt):
    """{variant: step(img, mask)}: pretrain.py's step with the token-wise or the DTM loss, eager and
    compiled (the compiled student shares its weights and optimizer with the eager one)."""
    params = list(student.parameters())
    modes = [("eager", student, teacher)]
    if args.compile:
        compiled_teacher = torch.compile(teacher) if args.compile_teacher else teacher
        modes.append(("compiled", torch.compile(student), compiled_teacher))
    steps = {}
    for mode, s, t in modes:
        for kind in ("tokenwise", "dtm"):
            loss_fn = make_loss(cfg, kind, student.encoder.num_patches)

            def step(img, mask, s=s, t=t, loss_fn=loss_fn):
                with record_function("teacher"):
                    v = t(img)                          # (B, N, C) targets, full image

                def loss_of():
                    with record_function("student forward"):
                        u = s(img, mask)                # (B, N, C) online tokens, masked image
                    with record_function("loss"):
                        return loss_fn(u, v)
                train_step(loss_of, params, opt, autocast, cfg.clip_grad)
            steps[f"{kind} {mode}"] = step
    return steps


def bench_distill(args, cfg, device, autocast, peak, setup, batch):
    teacher_name, teacher, student, opt, flops = setup
    img = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    mask = batch_of_masks(cfg, batch).to(device)
    steps = distill_steps(args, cfg, autocast, student, teacher, opt)
    fns = {key: (lambda step=step: step(img, mask)) for key, step in steps.items()}
    print(f"  distill {cfg.model} + {teacher_name}: batch {batch}, {list(fns)} ...", flush=True)
    times = time_interleaved(fns, device, args.warmup, args.steps)
    resident = state_bytes(student, teacher, opt)
    name = f"{cfg.model}+{teacher_name}"
    rows = []
    for key in fns:
        mode = key.split()[1]
        rows.append(row("distill", f"{name} {key}", batch, times[key], f"{name} tokenwise {mode}",
                        f"tokenwise {mode}", flops, peak,
                        step_peak_bytes(fns[key], device, resident)))
    if args.profile:
        profile({key: fn for key, fn in fns.items() if key.endswith("eager")}, device)
    return rows, steps, fns


# -----------------------------------------------------------------------------
# Section: DTM alone

# ops that launch no kernel: views, allocation, dtype queries
NO_KERNEL_OPS = {"view", "_unsafe_view", "_reshape_alias", "reshape", "expand", "expand_as",
                 "slice", "select", "narrow", "as_strided", "as_strided_", "unsqueeze",
                 "unsqueeze_", "squeeze", "squeeze_", "t", "transpose", "permute", "detach",
                 "alias", "lift_fresh", "resize_", "resolve_conj", "resolve_neg", "result_type"}


def kernel_count(fn):
    """The ATen ops one call of fn runs that reach a kernel (~ GPU launches), by torch.profiler on
    the CPU: views and allocations left out, a composite op (matmul, cosine_similarity, argsort;
    all its overloads CompositeImplicitAutograd) counted as the ops it calls, any other op once."""
    from torch.profiler import profile as torch_profile

    def composite(name):
        packet = getattr(torch.ops.aten, name, None)
        found = []
        for overload in packet.overloads() if packet is not None else []:
            full = f"aten::{name}" + ("" if overload == "default" else f".{overload}")
            try:
                found.append(torch._C._dispatch_has_kernel_for_dispatch_key(
                    full, "CompositeImplicitAutograd"))
            except RuntimeError:  # an overload only Python knows (e.g. sort.int)
                pass
        return bool(found) and all(found)

    def count(event):
        name = event.name[len("aten::"):]
        if name in NO_KERNEL_OPS or name.startswith("empty"):
            return 0
        if composite(name):
            return sum(count(c) for c in event.cpu_children if c.name.startswith("aten::"))
        return 1

    with torch_profile() as prof:
        fn()
    return sum(count(e) for e in prof.events() if e.name.startswith("aten::")
               and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")))


def dtm_kernel_counts(cfg, draws=20, N=196, batch=2, dim=64):
    """Kernels of one DTM loss step (forward + backward; levels drawn as in training, seeds
    0..draws-1; the mean) and of one token-wise step, on CPU tensors (B, N, C). The count does
    not depend on B and C (the same at B = 32, C = 512), so small tensors keep it quick."""
    u = torch.randn(batch, N, dim, requires_grad=True)
    v = torch.randn(batch, N, dim)
    counts = []
    for seed in range(draws):
        levels = losses.sample_levels(N, cfg.dtm_levels, cfg.dtm_max_iters, cfg.dtm_min_morphed,
                                      random.Random(seed))
        counts.append(kernel_count(lambda: losses.dtm_loss(u, v, levels).backward()))
    return statistics.mean(counts), kernel_count(lambda: losses.tokenwise_loss(u, v).backward())


def bench_dtm(args, cfg, device, autocast, out_dim, batch, num_patches):
    """dtm_assignment on random targets (B, 196, C) for several (N_m, k) and for levels drawn as in
    training; then the loss alone, forward + backward, token-wise vs DTM, at the student's N.
    Printed first: the kernels of one DTM loss step at N = 196 (dtm_kernel_counts)."""
    N = 196
    v = torch.randn(batch, N, out_dim, device=device)
    fns = {f"assignment N=196 N_m={nm} k={k}": (lambda nm=nm, k=k: losses.dtm_assignment(v, nm, k))
           for nm, k in DTM_CASES}
    rng = random.Random(cfg.seed)

    def sampled():  # what one DTM step computes: L levels drawn as in training
        levels = losses.sample_levels(N, cfg.dtm_levels, cfg.dtm_max_iters, cfg.dtm_min_morphed,
                                      rng)
        for nm, k in levels:
            losses.dtm_assignment(v, nm, k)
    fns[f"assignment N=196, {cfg.dtm_levels} levels drawn"] = sampled

    # the loss alone: u in the student head's output dtype, v in fp32 as the teacher gives it
    u_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    u_leaf = torch.randn(batch, num_patches, out_dim, device=device, requires_grad=True)
    v_t = torch.randn(batch, num_patches, out_dim, device=device)
    for kind in ("tokenwise", "dtm"):
        loss_fn = make_loss(cfg, kind, num_patches)

        def loss_step(loss_fn=loss_fn):
            with autocast:
                loss = loss_fn(u_leaf.to(u_dtype), v_t)
            loss.backward()
            u_leaf.grad = None
        fns[f"loss fwd+bwd N={num_patches} {kind}"] = loss_step
    draws = 20
    ops, tokenwise_ops = dtm_kernel_counts(cfg, draws)
    print(f"  DTM loss ops per step (fwd+bwd, mean over {draws} draws): {ops:.1f} "
          f"(token-wise: {tokenwise_ops})", flush=True)
    print(f"  dtm: batch {batch}, C = {out_dim}, {len(fns)} cases ...", flush=True)
    times = time_interleaved(fns, device, args.warmup, max(args.steps, 10))
    rows = []
    for key in fns:
        dtm_loss = key.startswith("loss") and key.endswith(" dtm")
        ref = key.replace(" dtm", " tokenwise") if dtm_loss else None
        r = row("dtm", key, batch, times[key], ref, "tokenwise loss" if dtm_loss else None)
        r["images_s"] = None  # a part of a step, not a step
        rows.append(r)
    return rows


# -----------------------------------------------------------------------------
# Section: the smaller stalls (counted: a CPU has no GPU to wait for)

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select")


def host_reads(fn) -> int:
    """Device -> host reads (each a GPU sync) of one call of fn: Tensor.tolist calls and ATen ops
    that read a value or a data-dependent size. A read inside torch._assert_async is left out: on
    a GPU that check runs on the device without a sync."""
    from torch.profiler import profile as torch_profile
    calls, tolist = [0], torch.Tensor.tolist

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return tolist(self, *args, **kwargs)

    def in_assert(event):
        while event is not None:
            if event.name == "aten::_assert_async":
                return True
            event = event.cpu_parent
        return False
    torch.Tensor.tolist = counted
    try:
        with torch_profile() as prof:
            fn()
    finally:
        torch.Tensor.tolist = tolist
    return calls[0] + sum(e.name in SYNC_OPS and not in_assert(e) for e in prof.events())


def recipe(name, *overrides):
    """A shipped config (configs/NAME) with key=value overrides."""
    return parse_config(pretrain.Config, ["--config", os.path.join(CONFIGS, name), *overrides])


def bench_stalls(args, cfg, batch):
    """Point 5's smaller stalls, before and after, counted: host reads of one MAE + MTO loss
    step (|M| read from the masks, or known from the data set); the buffers DDP would copy
    from rank 0 before each forward of the DTM recipe's student (all of them, or none when
    common.syncs_buffers finds no running statistics); the ops of one EMA teacher update (a
    lerp_ per parameter tensor, or model.EMATeacher's one multi-tensor lerp)."""
    name = (args.models or cfg.model).split(",")[0]
    mae = recipe("in1k_vit_base_mae_mto.yaml", f"model={name}", f"img_size={cfg.img_size}",
                 f"patch_size={cfg.patch_size}")
    student = pretrain.build_mim(mae, pretrain.build_encoder(mae))
    N = student.encoder.num_patches
    mask = batch_of_masks(mae, batch)                               # (B, N), |M| per image
    img = torch.rand(batch, 3, mae.img_size, mae.img_size)

    def mae_step(num_masked):
        loss_fn = pretrain.PretrainLoss(mae, N, num_masked)
        return lambda: loss_fn(student, img, mask, None, 0, 0)[0].backward()
    known = int(mask[0].sum())
    counts = [("host reads, MAE + MTO loss step (fwd + bwd)",
               host_reads(mae_step(None)), host_reads(mae_step(known)))]

    dtm = recipe("in1k_vit_base_dtm.yaml", f"model={name}")
    encoder = pretrain.build_encoder(dtm)
    buffers = list(encoder.buffers())
    after = len(buffers) if common.syncs_buffers(encoder) else 0
    counts.append((f"buffers DDP copies per forward, DTM recipe's {name} (relative position "
                   "bias)", len(buffers), after))

    ema = M.EMATeacher(encoder)
    params = list(encoder.parameters())

    def per_tensor():
        with torch.no_grad():
            for t, s in zip(ema.encoder.parameters(), params):
                t.lerp_(s, 0.004)
    counts.append((f"ops of one EMA teacher update, {name} ({len(params)} tensors)",
                   kernel_count(per_tensor), kernel_count(lambda: ema.update(encoder, 0.996))))
    for what, before, after in counts:
        print(f"  stalls: {what}: before {before}, after {after}", flush=True)
    return [{"what": what, "before": before, "after": after} for what, before, after in counts]


# -----------------------------------------------------------------------------
# Section: the data pipeline

def make_jpegs(root, count, workers, seed=0, num_classes=10):
    """An ImageNet-layout folder (root/train/classXXX/*.jpg) of `count` JPEGs of ImageNet's usual
    sizes (about 500 x 375), smooth random content plus noise, quality 90 (~80 kB, ImageNet
    ~110 kB)."""
    jobs = [(root, i, seed, num_classes) for i in range(count)]
    with multiprocessing.get_context("fork").Pool(max(workers, 1)) as pool:
        pool.map(_write_jpeg, jobs, chunksize=16)


def _write_jpeg(job):
    import numpy as np
    from PIL import Image
    root, i, seed, num_classes = job
    rng = np.random.default_rng([seed, i])
    w, h = [(500, 375), (500, 333), (375, 500), (500, 400), (333, 500)][rng.integers(5)]
    low = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.float32)
    pixels = (smooth + rng.normal(0, 10, size=(h, w, 3))).clip(0, 255).astype(np.uint8)
    folder = os.path.join(root, "train", f"class{i % num_classes:03d}")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(pixels).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def bench_precision(args, cfg, device):
    """pretrain.py's step at the config's batch with its own teacher (teacher=cnn: a SmallCNN with
    random weights, timing only; else the tiny CLIP), fp32 against bf16 autocast (the `precision`
    key), plus one block's attention alone in bf16: PyTorch's fused kernel against the explicit
    softmax(q k^T / sqrt(d)) v that model.Attention uses for bf16 on a CPU."""
    import torch.nn.functional as F
    batch = args.batch or cfg.batch_size
    torch.manual_seed(cfg.seed)
    student = M.DistillStudent(pretrain.build_encoder(cfg), 128).to(device)
    if cfg.teacher == "cnn":
        teacher = M.CNNTeacher(M.SmallCNN(10, width=128), cfg.img_size).to(device)
    else:
        teacher = random_clip_teacher(args.teacher or TINY_CLIP).to(device)
        student.head = torch.nn.Linear(student.head.in_features, teacher.out_dim).to(device)
    opt = make_optimizer(student, cfg, device)
    loss_fn = pretrain.PretrainLoss(cfg, student.encoder.num_patches)
    img = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device)
    grid = cfg.img_size // cfg.patch_size
    mask = torch.stack([data.block_mask(grid, data.num_masked_patches(grid * grid, cfg.mask_ratio),
                                        cfg.mask_min_patches) for _ in range(batch)]).to(device)
    counter = iter(range(10 ** 9))

    def step(precision):
        def run():
            v = teacher(img)
            loss_of = lambda: loss_fn(student, img, mask, v, next(counter), 0)[0]  # noqa: E731
            train_step(loss_of, list(student.parameters()), opt,
                       common.autocast(precision, device), cfg.clip_grad)
        return run
    fns = {"step fp32": step("fp32"), "step bf16": step("bf16")}
    blk = student.encoder.blocks[0].attn
    T, H = 1 + grid * grid, blk.num_heads
    head_dim = M.VIT_SIZES[cfg.model]["embed_dim"] // H
    q, k, v = (torch.randn(batch, H, T, head_dim, device=device, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    fns["attention bf16 fused"] = lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()
    fns["attention bf16 explicit"] = lambda: (((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]))
                                              .softmax(-1) @ v).sum().backward()
    times = time_interleaved(fns, device, args.warmup, args.steps)
    refs = {"step fp32": "step fp32", "step bf16": "step fp32",
            "attention bf16 fused": "attention bf16 fused",
            "attention bf16 explicit": "attention bf16 fused"}
    return [row("precision", name, batch, t, ref=refs[name], vs=refs[name])
            for name, t in times.items()]


LOADER_RECIPE = os.path.join(CONFIGS, "in1k_vit_base_dtm.yaml")  # the loader's transform, masks
LOADER_BLOCK = 10  # samples per timed call of the loader section


def legacy_transform(img_size, crop_scale_min, color_jitter):
    """The transform before the crop-first change, kept here as the loader section's reference:
    colour jitter on the whole decoded image, then the crop, then float32 normalised in the
    worker."""
    from torchvision.transforms import v2 as T
    return T.Compose([T.ToImage(), T.ColorJitter(color_jitter, color_jitter, color_jitter),
                      T.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True),
                      T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True),
                      T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def bench_loader(args, folder):
    """One loader worker's work per sample on ImageNet-sized JPEGs with the ImageNet DTM recipe's
    transform and mask (decode, augment, mask), before (jitter first, float32) and after (crop
    first, uint8; normalised on the device): ms per LOADER_BLOCK samples in this process (one
    worker = one core), and the bytes each batch takes through shared memory and the bus."""
    rcfg = parse_config(pretrain.Config, ["--config", LOADER_RECIPE])
    root = args.jpeg_dir or os.path.join(folder, "jpegs")
    have = sum(len(files) for _, _, files in os.walk(os.path.join(root, "train")))
    if have < args.jpeg_count:
        make_jpegs(root, args.jpeg_count, args.workers)
    grid = rcfg.img_size // rcfg.patch_size
    tfs = {"before: jitter first, float32": legacy_transform,
           "after: crop first, uint8": data.pretrain_transform}
    sets = {name: data.MaskedImages(
        data.build_dataset("imagefolder", root, train=True,
                           transform=tf(rcfg.img_size, rcfg.crop_scale_min, rcfg.color_jitter)),
        grid, rcfg.mask_ratio, rcfg.mask, rcfg.mask_min_patches, rcfg.seed)
        for name, tf in tfs.items()}
    n = min(len(ds) for ds in sets.values())
    counter = iter(range(10 ** 9))

    def block(ds):
        def fn():
            start = next(counter) * LOADER_BLOCK
            for i in range(start, start + LOADER_BLOCK):
                ds[(0, i % n)]
        return fn
    with torch.inference_mode():
        times = time_interleaved({k: block(ds) for k, ds in sets.items()}, torch.device("cpu"),
                                 1, max(args.steps, 5))
    ref = next(iter(times))
    rows = [row("loader", name, LOADER_BLOCK, t, ref=ref, vs=ref[:6]) for name, t in times.items()]
    img = sets[next(reversed(sets))][(0, 0)][0]
    per_batch = RECIPE_GPU_BATCH * img.numel()
    print(f"  loader: {rcfg.img_size} px, crop >= {rcfg.crop_scale_min}, jitter "
          f"{rcfg.color_jitter} ({os.path.basename(LOADER_RECIPE)}); a batch of "
          f"{RECIPE_GPU_BATCH} images (one GPU's) is "
          f"{4 * per_batch / 2 ** 20:.1f} MiB as float32, {per_batch / 2 ** 20:.1f} MiB as uint8",
          flush=True)
    return rows


def bench_data(args, cfg, device, steps, on_device, batch, folder):
    """The DTM step fed from a DataLoader over JPEGs vs on tensors already on the device.

    steps: {variant: step(img, mask)}; on_device: {variant: the same step on fixed device tensors}.
    Timed in blocks of back-to-back steps, not single steps: the loader keeps `workers x prefetch`
    batches in flight, so each JPEG block first drains that queue, then times `steps` steps.
    """
    from torch.utils.data import DataLoader, RandomSampler
    root = args.jpeg_dir or os.path.join(folder, "jpegs")
    have = sum(len(files) for _, _, files in os.walk(os.path.join(root, "train")))
    if have < args.jpeg_count:
        t0 = time.time()
        make_jpegs(root, args.jpeg_count, args.workers)
        print(f"  data: wrote {args.jpeg_count} JPEGs to {root} in {time.time() - t0:.0f} s",
              flush=True)
    transform = data.pretrain_transform(cfg.img_size, cfg.crop_scale_min, cfg.color_jitter)
    base = data.build_dataset("imagefolder", root, train=True, transform=transform)
    dataset = data.MaskedImages(base, cfg.img_size // cfg.patch_size, cfg.mask_ratio, cfg.mask,
                                cfg.mask_min_patches, cfg.seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=10 ** 9,  # one endless epoch
                            generator=torch.Generator().manual_seed(cfg.seed))
    prefetch = 2  # DataLoader's default, as in pretrain.py (each batch in flight sits in /dev/shm)
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=args.workers > 0,
                        prefetch_factor=prefetch if args.workers > 0 else None)
    batches = iter(loader)
    key = "dtm compiled" if "dtm compiled" in steps else "dtm eager"

    def fed():
        img, mask, _ = next(batches)
        steps[key](data.normalize(img.to(device, non_blocking=True)),
                   mask.to(device, non_blocking=True))

    queue = args.workers * prefetch  # batches in flight
    print(f"  data: {args.workers} workers, batch {batch}, {queue} batches in flight, {key} ...",
          flush=True)
    blocks = (("tensor", on_device[key], args.warmup), ("jpeg", fed, queue + args.warmup),
              ("loader", lambda: next(batches), queue))
    times = {name: [] for name, _, _ in blocks}
    for _ in range(2):
        for name, fn, warm in blocks:
            for _ in range(warm):
                fn()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / args.steps)  # one block: mean step time
    del batches, loader
    labels = {"tensor": f"{key}, tensors on device", "jpeg": f"{key}, fed from JPEGs",
              "loader": "loader alone: decode, augment, mask, pin"}
    rows = []
    for name in times:
        ref, vs = (None, None) if name == "tensor" else (labels["tensor"], "tensors on device")
        rows.append(row("data", labels[name], batch, times[name], ref, vs))
    return rows


# -----------------------------------------------------------------------------
# Profiling

def profile(fns, device, steps=3):
    """torch.profiler over a few steps of each variant: time per phase of the step, then the ops."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name, fn in fns.items():
        fn()
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            sync(device)
        events = prof.key_averages()
        print(f"\n--- profile: {name}, {steps} steps; per step: phase, CPU ms"
              + (", device ms" if cuda else ""))
        for e in events:
            if e.key in PHASES:
                dev = f" {e.device_time_total / 1e3 / steps:9.2f}" if cuda else ""
                print(f"    {e.key:16} {e.cpu_time_total / 1e3 / steps:9.2f}{dev}")
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(events.table(sort_by=sort_by, row_limit=20))


def free(device):
    """Let go of what a section built: compiled graphs, then cached device memory."""
    import gc
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# Table and targets

def fill_ratios(rows):
    """ratio = median over rounds of (this step's time / the reference's time in the same round).

    Variants ran in turn, one step each per round, so pairing by round cancels load changes slower
    than a round. ratio_spread: half the interquartile range of those paired ratios.
    """
    by_name = {(r["section"], r["variant"]): r for r in rows}
    for r in rows:
        ref = by_name.get((r["section"], r["ref"]))
        if ref is None:
            continue
        paired = [a / b for a, b in zip(r["seconds"], ref["seconds"])]
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        r["ratio"], r["ratio_spread"] = statistics.median(paired), (q[2] - q[0]) / 2
        if ref is r:
            r["vs"] = "(reference)"


def noise(r):
    """A ~95% band for a paired ratio: 2 standard errors of a median estimated from the
    interquartile range (sigma ~ IQR / 1.35; SE of a median ~ 1.25 sigma / sqrt(n))."""
    return 2 * 1.25 * (2 * r["ratio_spread"]) / 1.35 / len(r["seconds"]) ** 0.5


def fmt(value, spec, none="n/a"):
    return none if value is None else format(value, spec)


def print_table(rows):
    head = (f"{'section':8} {'variant':44} {'batch':>5} {'ms':>9} {'+-%':>5} {'img/s':>8} "
            f"{'ratio':>6}  {'vs':22} {'MFU':>6} {'peak GiB':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['section']:8} {r['variant']:44} {r['batch']:5d} {r['ms']:9.2f} "
              f"{100 * r['spread']:5.1f} {fmt(r['images_s'], '8.1f'):>8} "
              f"{fmt(r['ratio'], '6.3f', ''):>6}  {r['vs'] or '':22} "
              f"{fmt(r['mfu'], '.1%'):>6} {fmt(r['peak_gib'], '8.2f'):>8}")


def targets(rows, args, cfg, teacher_name):
    """The issue's targets as (text, measured value, limit, noise band); limit < 0 means
    >= -limit."""
    by_name = {(r["section"], r["variant"]): r for r in rows}
    out = []
    for r in rows:
        ref = by_name.get((r["section"], r["ref"]))
        if ref is None or ref is r or r["section"] not in ("step", "distill", "data"):
            continue
        text, limit = {"step": ("ours / timm", 1.00), "distill": ("DTM / token-wise", 1.02),
                       "data": ("fed from JPEGs / from device tensors", 1.10)}[r["section"]]
        if r["section"] != "data" or "JPEGs" in r["variant"]:
            out.append((f"{r['variant']}: {text} <= {limit:.2f}", r["ratio"], limit, noise(r)))
    # DTM's overhead from the loss timed alone (no step noise; the mean over its random (N_m, k)
    # draws), over the token-wise step as the recipe runs it (compiled when there are such rows)
    n = cfg.img_size // cfg.patch_size
    dtm, tok = (by_name.get(("dtm", f"loss fwd+bwd N={n * n} {k}")) for k in ("dtm", "tokenwise"))
    steps = {r["variant"].rsplit(" ", 1)[-1]: r for r in rows
             if r["section"] == "distill" and " tokenwise " in r["variant"]}
    mode = "compiled" if "compiled" in steps else "eager"
    if dtm and tok and mode in steps:
        mean = lambda r: statistics.mean(r["seconds"])  # noqa: E731
        out.append((f"(DTM loss - token-wise loss, timed alone, mean over draws) / token-wise "
                    f"{mode} step <= 0.02", (mean(dtm) - mean(tok)) / mean(steps[mode]), 0.02,
                    0.0))
    headline = [r for r in rows if r["section"] == "distill" and " dtm " in r["variant"]]
    if (headline and args.device == "cuda" and cfg.model == "vit_base"
            and teacher_name == "ViT-B-16-quickgelu" and cfg.img_size == 224
            and headline[0]["batch"] == RECIPE_GPU_BATCH):
        best = max(headline, key=lambda r: r["images_s"])
        out.append((f"{best['variant']}: images/s >= 2300", best["images_s"], -2300, 0.0))
    return out


def verdict(value, limit, band):
    """limit > 0: value must be <= limit; limit < 0: value must be >= -limit."""
    if (value <= limit) if limit > 0 else (value >= -limit):
        return "ok"
    return "noise" if limit > 0 and value <= limit + band else "MISS"


# -----------------------------------------------------------------------------
# Main

def main(argv):
    args = parse_args(argv)
    cfg = parse_config(pretrain.Config, ["--config", args.config, *args.overrides])
    device = torch.device(args.device)
    torch.manual_seed(cfg.seed)
    peak = device_peak_flops(args)
    bf16 = args.precision == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else torch.float32,
                              enabled=bf16)
    import open_clip
    import timm
    if device.type == "cuda":
        where = torch.cuda.get_device_name()
    else:
        where = f"CPU, {torch.get_num_threads()} threads"
    print(f"command: python bench.py {' '.join(argv)}")
    print(f"device: {where}; torch {torch.__version__}, timm {timm.__version__}, "
          f"open_clip {open_clip.__version__}")
    print(f"config: {' '.join([args.config, *args.overrides])}; {args.precision}; "
          f"{cfg.img_size} px, patch {cfg.patch_size}; {args.warmup} warm-up + {args.steps} timed "
          f"steps per variant; dense bf16 peak {fmt(peak and peak / 1e12, '.0f')} TFLOP/s")
    print("NOTE: the teacher's weights are RANDOM (open_clip architecture, no download): "
          "timing only.", flush=True)
    rows, teacher_name, t_start = [], None, time.time()
    batch = args.batch or (RECIPE_GPU_BATCH if args.device == "cuda" else CPU_BATCH)
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    with tempfile.TemporaryDirectory() as folder:
        if args.device == "cpu" and not args.teacher:
            register_tiny_clip(cfg, folder)
        if "step" in args.sections:
            rows += bench_step(args, cfg, device, autocast, peak)
        if "relpos" in args.sections:
            rows += bench_relpos(args, cfg, device, autocast)
        out_dim = 512 if args.device == "cuda" else 64
        if "distill" in args.sections or "data" in args.sections:
            setup = build_distill(args, cfg, device)
            teacher_name, out_dim = setup[0], setup[1].out_dim
            drows, steps, fns = bench_distill(args, cfg, device, autocast, peak, setup, batch)
            rows += drows
            if "data" in args.sections:
                rows += bench_data(args, cfg, device, steps, fns, batch, folder)
            del setup, steps, fns
            free(device)
        if "dtm" in args.sections:
            rows += bench_dtm(args, cfg, device, autocast, out_dim, batch, num_patches)
        if "precision" in args.sections:
            rows += bench_precision(args, cfg, device)
        if "loader" in args.sections:
            rows += bench_loader(args, folder)
        counts = bench_stalls(args, cfg, batch) if "stalls" in args.sections else []
    fill_ratios(rows)
    print(f"\nmeasured in {time.time() - t_start:.0f} s. ms: median step; +-%: half the "
          "interquartile range; ratio: median of the per-round time ratios to the row named in vs")
    print_table(rows)
    if device.type == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(f"peak memory: n/a per row on CPU; the process's max RSS was {rss:.2f} GiB")
    # dtm rows left out: their drawn levels vary by design
    if any(r["spread"] > 0.10 for r in rows if r["section"] != "dtm"):
        print("WARNING: some rows vary by more than 10% from step to step (a busy machine?): "
              "trust the ratios, not the absolute times, or rerun")
    checks = targets(rows, args, cfg, teacher_name)
    if checks:
        print("\ntargets (ok | noise: missed by less than the ~95% noise band of the paired "
              "ratio | MISS):")
        for text, value, limit, band in checks:
            shown = f" (band +-{band:.3f})" if band else ""
            print(f"  {verdict(value, limit, band):5} {text}: {value:.3f}{shown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": argv, "device": where, "rows": rows, "counts": counts,
                       "targets": [{"target": t, "value": v, "verdict": verdict(v, lim, b)}
                                   for t, v, lim, b in checks]}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
