"""Plumbing shared by pretrain.py, finetune.py and probe.py: config, DDP, schedule, checkpoints.

Nothing about the methods lives here; read the stage scripts for that.
"""
import contextlib
import dataclasses
import difflib
import fcntl
import inspect
import itertools
import json
import math
import os
import pickle
import signal
import socket
import sys
import time
import typing
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import yaml
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm


class ConfigError(ValueError):
    """A bad config key or value: the scripts print it as one line and exit with code 2."""


class RunError(RuntimeError):
    """A fault during the run (NaN loss, a lost process, a full disk): one line, exit code 3."""


# -----------------------------------------------------------------------------
# Config: dataclass defaults < --config file.yaml < key=value on the command line

def parse_config(cls, argv):
    """Build the config dataclass `cls` from argv = ['--config', 'x.yaml', 'key=value', ...]."""
    values, args = {}, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else "")
            try:
                with open(path) as f:  # a missing file: FileNotFoundError, one line too
                    read = yaml.safe_load(f) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                mark = getattr(e, "problem_mark", None)
                at = f" at line {mark.line + 1}" if mark else ""
                raise ConfigError(f"config file '{path}' is not valid YAML{at}: write one "
                                  "'key: value' per line") from None
            if not isinstance(read, dict):
                raise ConfigError(f"config file '{path}' must hold a mapping of key: value")
            values.update(read)
        elif "=" in arg and not arg.startswith("-"):
            key, text = arg.split("=", 1)
            values[key] = yaml.safe_load(text) if text != "" else ""
        else:
            raise ConfigError(f"cannot read argument '{arg}': use --config FILE.yaml and "
                              "key=value overrides")
    return make_config(cls, values)


def make_config(cls, values: dict):
    """Check every key and type against the dataclass, then the ranges, then its `validate()`."""
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; see the Config class for the "
                              "allowed keys")
    cfg = cls(**{key: _check_type(key, value, hints[key]) for key, value in values.items()})
    check_ranges(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _check_type(key, value, kind):
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):  # YAML reads 1e-3 (no dot) as a string
            value = float(value)
    if kind in (int, float, str, bool):
        if type(value) is not kind:
            raise ConfigError(f"config key '{key}' must be {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return value
    if typing.get_origin(kind) is list:  # List[int], List[str]: each item
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        return [_check_type(key, v, typing.get_args(kind)[0]) for v in value]
    return value


GT0, GE0, GE1 = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), (lambda v: v >= 1, ">= 1")
# bounds of keys the stage configs share (a config without the key skips it)
SHARED_LIMITS = {
    "blr": GT0, "lr": GE0,
    **dict.fromkeys(("patch_size", "epochs", "batch_size", "accum_steps", "log_every",
                     "dist_timeout_s", "save_every", "eval_every", "knn_k"), GE1),
    **dict.fromkeys(("min_lr", "weight_decay", "warmup_epochs", "num_workers", "subset",
                     "val_subset", "drop_path", "layer_scale", "label_smoothing", "mixup", "cutmix",
                     "reprob", "randaug_ops", "img_size"), GE0)}


def check_ranges(cfg):
    """One loop over the tables: the config's CHOICES {key: allowed values} (a list: each item),
    then SHARED_LIMITS and the config's LIMITS {key: (test, "what")}."""
    for key, allowed in getattr(cfg, "CHOICES", {}).items():
        value = getattr(cfg, key)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            check_choice(key, v, allowed)
    shared = {k: v for k, v in SHARED_LIMITS.items() if hasattr(cfg, k)}
    for key, (ok, what) in {**shared, **getattr(cfg, "LIMITS", {})}.items():
        value = getattr(cfg, key)
        if not ok(value):
            raise ConfigError(f"config key '{key}' must be {what}, got {value}")


def check_choice(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")


config_dict = dataclasses.asdict  # the config as plain values (config.yaml, checkpoints)


# -----------------------------------------------------------------------------
# Distributed: one code path for CPU, one GPU and torchrun

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", timeout_s: int = 600) -> Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU, and gloo when more
    processes on a node than GPUs share them (a check on one GPU; NCCL refuses that)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible: use device=cpu or "
                          "device=auto")
    if "RANK" not in os.environ:
        return Dist(device=torch.device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    where, backend = torch.device("cpu"), "gloo"
    if device == "cuda":
        gpus = torch.cuda.device_count()
        where = torch.device("cuda", local % gpus)
        torch.cuda.set_device(where)
        shared = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) > gpus
        backend = "gloo" if shared else "nccl"
        if shared and local == 0:
            print(f"warning: {os.environ['LOCAL_WORLD_SIZE']} processes share {gpus} GPU(s): "
                  "gloo instead of NCCL (slow; for checks only)", flush=True)
    # start-up may keep ranks waiting long (rank 0 reads a large image folder, trains the CNN
    # teacher, loads a checkpoint): an hour; Run.resume then sets dist_timeout_s
    dist.init_process_group(backend, timeout=timedelta(seconds=max(timeout_s, 3600)),
                            device_id=where if backend == "nccl" else None)
    return Dist(rank, world, local, where)


def set_collective_timeout(timeout_s: int):
    """After start-up: a collective that waits longer than timeout_s (a lost process) fails the
    run. NCCL's watchdog then aborts the process (exit 134, SIGABRT); gloo raises (exit 3)."""
    set_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch >= 2.3
    if dist.is_initialized() and set_timeout is not None:
        set_timeout(timedelta(seconds=timeout_s))


PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes bf16 matmuls in hardware: CUDA (Ampere or newer), or a CPU
    with AVX512-BF16 or AMX. Elsewhere a CPU emulates bf16 and is slower than in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported",
                                                                "_is_amx_tile_supported"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """The config's `precision` -> "bf16" | "fp32". auto: bf16 where the hardware has it."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bf16 autocast for the forward and loss (weights, optimizer and gradients stay fp32, as in
    timm and MAE), or a no-op context for fp32."""
    bf16 = resolve_precision(precision, device) == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(t) / dist.get_world_size() if dist.is_initialized() else t


def shard(size: int, rank: int, world: int) -> list:
    """An evaluation shard without padding: rank r takes r, r + world, ... so the counts summed
    over ranks cover every sample once (DistributedSampler would repeat some)."""
    return list(range(rank, size, world))


# -----------------------------------------------------------------------------
# Optimisation helpers

def cosine_lr(step: float, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup for `warmup` steps, then half-cosine from base_lr to min_lr (MAE/BEiT)."""
    if step < warmup:
        return base_lr * step / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def cosine_schedule(cfg, lr: float, steps_per_epoch: int) -> list:
    """The lr of every step of the run (cfg.epochs, cfg.warmup_epochs, cfg.min_lr): cosine_lr."""
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return [cosine_lr(s, total, warmup, lr, cfg.min_lr) for s in range(total)]


def syncs_buffers(model: torch.nn.Module) -> bool:
    """Whether DDP must copy rank 0's buffers to every rank before each forward: only for
    running statistics (BatchNorm in the probe heads); the ViT's buffers are constant tables."""
    return any(isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
               for m in model.modules())


def ddp(model: torch.nn.Module, dist_: Dist, compile: bool = False) -> torch.nn.Module:
    """DistributedDataParallel with several processes, then torch.compile if asked, around DDP
    (PyTorch's documented order)."""
    if dist_.world > 1:
        # newer torch names broadcast_buffers forward_sync_buffers (and deprecates the old name)
        sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
        ids = [dist_.device.index] if dist_.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                        **{sync: syncs_buffers(model)})
    return torch.compile(model) if compile else model


NO_DECAY = ("cls_token", "mask_token", "pos_embed", "relative_position_bias_table")


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on norms, biases, tokens and position tables (BEiT/MAE convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim <= 1 or any(key in name for key in NO_DECAY)
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# Checkpoints: written atomically, read with weights_only=True

def save_atomic(obj, path: str):
    """torch.save to `<path>.tmp`, then os.replace: a kill mid-write leaves the old file intact
    (and a .tmp that the next save overwrites). A failed write (a full disk) is one line."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or first_line(e)[:120]
        raise RunError(f"cannot write '{path}' ({reason}): if the disk is full, free "
                       "some space; then rerun the same command to resume (the previous file is "
                       "intact)") from None


def read_torch_file(path: str, safe_globals=()) -> dict:
    """torch.load with weights_only=True: tensors and plain values (and the classes in
    `safe_globals`) only, never code. Raises ValueError with the reason in a few words."""
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):
            raise ValueError("it holds Python objects other than tensors and plain values, which "
                             "are never loaded (they could run code)") from None
        raise ValueError("it is not a file written by torch.save") from None
    except Exception as e:  # noqa: BLE001 - random bytes fail anywhere in the unpickler
        raise ValueError(f"it is truncated or not a torch file ({first_line(e)[:80]})") from None


def load_checkpoint(path: str, rank: int = 0, step: int = None) -> dict:
    """A run's own checkpoint.pth; unreadable: one line. rank > 0: the file rank 0 resumes from,
    which must hold rank 0's `step`."""
    shared = ("out_dir must be one folder that every node sees (a shared file system), or "
              "copy rank 0's checkpoint.pth to every node")
    if rank and not os.path.isfile(path):
        raise RunError(f"rank {rank} cannot find '{path}', which rank 0 resumes from: {shared}")
    try:
        ckpt = read_torch_file(path)
    except ValueError as e:
        raise RunError(f"cannot read checkpoint '{path}': {e}; delete it to start over, or use a "
                       "new out_dir") from None
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        raise RunError(f"cannot read checkpoint '{path}': it is not a checkpoint of this project; "
                       "delete it to start over, or use a new out_dir")
    if rank and ckpt["step"] != step:
        raise RunError(f"rank {rank} reads step {ckpt['step']} from '{path}' where rank 0 resumes "
                       f"from step {step}: {shared}")
    return ckpt


def read_weights(path: str, key: str, safe_globals=()) -> dict:
    """A weights file named by config key `key` (init, backbone, teacher_pretrained): missing,
    unreadable, or a training checkpoint -> one line (exit 2)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config key '{key}': file '{path}' does not exist")
    try:
        state = read_torch_file(path, safe_globals)
    except ValueError as e:
        raise ConfigError(f"config key '{key}': cannot read '{path}': {e}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"config key '{key}': '{path}' holds a {type(state).__name__}, not "
                          "weights")
    if "optimizer" in state and "step" in state:  # this project's checkpoint.pth
        raise ConfigError(f"config key '{key}': '{path}' is a training checkpoint, not weights: "
                          "give the encoder.pth (pretrain.py) or model_timm.pth (finetune.py) of "
                          "that run")
    return state


def load_state(module: torch.nn.Module, state: dict, source: str):
    """module.load_state_dict(state, strict=True); a mismatch is one line naming the keys."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ConfigError(f"'{source}' does not fit this model: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, wrong shape {wrong[:3]}; use the settings it was "
                          "written with")
    module.load_state_dict(state, strict=True)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict, source: str):
    """optimizer.load_state_dict(state); parameter groups that do not match are one line."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"the optimizer state in '{source}' does not fit this model "
                          f"({first_line(e)}): resume with the settings and code version it was "
                          "written with") from None


# -----------------------------------------------------------------------------
# Run directories: one run per folder, config.yaml after the resume check, outputs before "done"

_held_locks = []  # the open .lock files of this process


def open_run_dir(out_dir: str):
    """Create out_dir and lock it (rank 0 holds out_dir/.lock until it exits); a folder that
    cannot be used stops every rank with one line."""
    with stop_all_on_error():
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ConfigError(f"out_dir '{out_dir}' is a file, not a folder: choose another "
                              "out_dir")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create out_dir '{out_dir}' ({e.strerror}): choose another "
                              "out_dir") from None
        if is_main():
            lock_run_dir(out_dir)


@contextlib.contextmanager
def stop_all_on_error():
    """Every rank runs the block. A ConfigError / RunError on any rank: rank 0 raises the first
    and the others exit quietly with its code (2 or 3), so none waits in a collective."""
    error = None
    try:
        yield
    except (ConfigError, RunError) as e:
        error = e
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None and is_main():
        raise first
    if first is not None:
        sys.exit(2 if isinstance(first, ConfigError) else 3)


def lock_run_dir(out_dir: str):
    """An exclusive fcntl.flock on out_dir/.lock, which the kernel drops however this process ends
    (SIGKILL included). The file names its holder for a run that finds it busy."""
    try:
        f = open(os.path.join(out_dir, ".lock"), "a+")
    except OSError as e:
        raise ConfigError(f"cannot write in out_dir '{out_dir}' ({e.strerror}): choose another "
                          "out_dir") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another run"
        f.close()
        raise ConfigError(f"out_dir '{out_dir}' is in use by {holder}: wait for it, stop it, or "
                          "choose another out_dir") from None
    f.truncate(0)  # (writes in "a+" mode go to the end)
    f.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held_locks.append(f)  # open for the life of the process: closing it would release the lock


def check_resume_config(saved: dict, current: dict, keys, path: str):
    """The keys that shape the model or its data must agree with the checkpoint's config `saved`,
    else one line listing each difference (exit 2)."""
    diff = [f"{k}={saved[k]!r} (now {current[k]!r})" for k in keys
            if k in saved and k in current and saved[k] != current[k]]
    if diff:
        raise ConfigError(f"{path} was written with {', '.join(diff)}: resume with the same "
                          "settings, or choose a new out_dir")


def log_json(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------
# Errors: one line on stderr, exit 2 for bad input, 3 for a fault during the run

LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out",
             "Timed out", "NCCL communicator was aborted", "watchdog")


def run_main(main):
    """Run a stage's main(); bad input is one line on stderr and exit code 2, a failure during
    the run (NaN loss, bad data, a lost process, a full disk) exit code 3."""
    try:
        main(sys.argv[1:])
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e), 2)
    except OSError as e:
        where = f" '{e.filename}'" if e.filename else ""
        _fail(f"{e.strerror or first_line(e)}{where}: fix it, then rerun the same command to "
              "resume", 3)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        msg = str(e).strip()
        if isinstance(e, RunError) or "cannot be downloaded" in msg:
            _fail(msg, 3)
        if not isinstance(e, RuntimeError) or "PytorchStreamReader" in msg:  # not by read_weights
            _fail(f"a weights file named in the config is not readable ({first_line(e)[:120]}): "
                  "check init, backbone and teacher_pretrained", 2)
        lost = isinstance(e, dist.DistError) or any(s in msg for s in LOST_PEER)
        if dist.is_initialized() and lost:
            _fail(f"rank {dist.get_rank()} lost contact with another process "
                  f"({first_line(e)[:200]}): a process died or a node failed; rerun the same "
                  "command to resume from the last checkpoint", 3)
        raise
    finally:
        cleanup_distributed()


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fail(message: str, code: int):
    for bar in list(getattr(tqdm, "_instances", ())):  # end open bars: the error gets a line
        bar.close()
    print(f"error: {message}", file=sys.stderr, flush=True)
    if code == 3 and dist.is_initialized():  # peers may be gone: do not wait for them in a barrier
        os._exit(code)
    sys.exit(code)  # run_main's `finally` ends the process group


# -----------------------------------------------------------------------------
# Preemption: SIGTERM (SLURM, torchrun) and SIGINT (Ctrl-C) ask for a checkpoint and a clean exit

class StopRequest:
    """Catch SIGTERM/SIGINT; the loop asks `should_stop()` at log steps (the flag reduced over
    ranks: all stop at the same step), saves, then `exit()`s with 128 + signal (143 SIGTERM, 130
    SIGINT), so `pretrain && finetune` does not go on with an unfinished encoder."""

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"signal {signal.Signals(signum).name}: saving a checkpoint at the next log step",
              flush=True)

    def should_stop(self, device) -> bool:
        flag = torch.tensor(float(self.signum), device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signum = int(flag.item())
        return self.signum > 0

    def exit(self):
        cleanup_distributed()
        sys.exit(128 + self.signum)


def ignore_stop_signals(worker_id: int = 0):
    """DataLoader worker_init_fn: the workers leave SIGTERM/SIGINT to the main process."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# Data loading: resumable mid-epoch, sharded

def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one optimisation step (drop path, ...): a function of (seed, step, rank),
    so a resumed run draws what an uninterrupted one draws, without saving RNG states."""
    return ((seed * 1_000_003 + step) * 1009 + rank) % (2 ** 63)


class SkipSampler(torch.utils.data.Sampler):
    """Wrap a (distributed) sampler, skip its first `skip` indices in the current epoch and yield
    (epoch, index) keys (data.MaskedImages reads both): a mid-epoch resume sees what an
    uninterrupted run would, and persistent workers still draw this epoch's augmentation."""

    def __init__(self, sampler):
        self.sampler, self.skip, self.epoch = sampler, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.sampler.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        return ((self.epoch, i) for i in itertools.islice(iter(self.sampler), self.skip, None))

    def __len__(self):
        return len(self.sampler) - self.skip


def train_loader(dataset, micro_batch: int, dist_: Dist, seed: int, num_workers: int) -> DataLoader:
    """A shuffled, sharded training loader that `Run.epoch_batches` positions (also mid-epoch).
    Its workers persist across epochs and ignore SIGTERM and SIGINT."""
    shards = DistributedSampler(dataset, num_replicas=dist_.world, rank=dist_.rank, shuffle=True,
                                seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=micro_batch, sampler=SkipSampler(shards),
                      num_workers=num_workers, pin_memory=dist_.device.type == "cuda",
                      drop_last=True, worker_init_fn=ignore_stop_signals,
                      persistent_workers=num_workers > 0)


def on_device(batches, device: torch.device):
    """Yield each batch (a tuple) with its tensors moved to `device`; from pinned memory the copy
    does not block the host (MAE's loop does the same)."""
    for b in batches:
        yield tuple(t.to(device, non_blocking=True) if torch.is_tensor(t) else t for t in b)


def no_sync(model: torch.nn.Module, micro: int, accum_steps: int):
    """DDP: all-reduce the gradients only on the last micro-batch of a step (a no-op otherwise)."""
    if micro == accum_steps - 1 or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


# -----------------------------------------------------------------------------
# A training run's plumbing behind one-line calls; the stage scripts keep only the method

class Run:
    """The run folder, resume, saving, stopping and logging of one training run:

        run = Run(cfg, dist, RESUME_KEYS)          # lock out_dir; check config vs checkpoint
        run.resume(steps_per_epoch, load, state)   # auto-resume, also mid-epoch
        for epoch in run.epochs():
            batches = run.epoch_batches(epoch, loader)
            for step in run.steps(epoch):          # progress bar; ends early on a signal
                run.set_lr(optimizer, lr_at[step])
                ...                                # the method
                optimizer.step()
                run.add({"loss": loss})            # reduced over ranks at each log step
            run.end_epoch(epoch)                   # stopped mid-epoch: save, exit 128 + signal
            run.save(epoch + 1, outputs)           # outputs first, then checkpoint.pth
            run.exit_if_stopped(epoch + 1)

    A resumed run sees the same data and draws the same random numbers as an uninterrupted one:
    the data order and `step_seed` depend only on (seed, epoch, step).
    """

    def __init__(self, cfg, dist_: Dist, resume_keys=None):
        self.cfg, self.dist, self.record = cfg, dist_, config_dict(cfg)
        if cfg.batch_size % (dist_.world * cfg.accum_steps):
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by world size "
                              f"{dist_.world} x accum_steps {cfg.accum_steps}: change batch_size "
                              "or accum_steps")
        self.micro_batch = cfg.batch_size // (dist_.world * cfg.accum_steps)
        print0(yaml.safe_dump(self.record, sort_keys=False))
        print0(f"world size {dist_.world}, micro-batch {self.micro_batch} per process, "
               f"{cfg.accum_steps} accumulation step(s), global batch {cfg.batch_size}")
        self.stop = StopRequest()  # SIGTERM (SLURM, torchrun) / SIGINT (Ctrl-C)
        open_run_dir(cfg.out_dir)  # one run per folder (out_dir/.lock)
        self.ckpt_path, self.log_path = self.path("checkpoint.pth"), self.path("log.jsonl")
        self.step, self.steps_per_epoch, self.stopping = 0, 0, False
        self.lr, self._sums, self._count = 0.0, {}, 0
        self._ckpt = self._read_resume(resume_keys) if resume_keys is not None else None
        if is_main():  # config.yaml: only once the checkpoint is known to match it
            with open(self.path("config.yaml"), "w") as f:
                yaml.safe_dump(self.record, f, sort_keys=False)

    def _read_resume(self, resume_keys):
        """The checkpoint to resume from, or None: rank 0 decides (its out_dir holds one), every
        rank reads it at rank 0's step and checks its config; any failure stops every rank."""
        ckpt, step = None, None
        with stop_all_on_error():
            if is_main() and os.path.isfile(self.ckpt_path):
                ckpt = load_checkpoint(self.ckpt_path)
                step = ckpt["step"]
        if dist.is_initialized():  # rank 0's step, for every rank
            box = [step]
            dist.broadcast_object_list(box, src=0)
            step = box[0]
        with stop_all_on_error():
            if step is not None and not is_main():
                ckpt = load_checkpoint(self.ckpt_path, self.dist.rank, step)
            if ckpt is not None:
                check_resume_config(ckpt["config"], self.record, resume_keys, self.ckpt_path)
        return ckpt

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.out_dir, name)

    # ---- resume and save

    def resume(self, steps_per_epoch: int, load, state):
        """Resume from checkpoint.pth if there is one: load(ckpt) restores the modules; `state()`
        gives what a checkpoint holds besides the position in the run. -> the checkpoint or None."""
        if steps_per_epoch == 0:
            raise ConfigError(f"the data gives no full step of {self.cfg.batch_size} images: "
                              "lower batch_size")
        self.steps_per_epoch, self._state = steps_per_epoch, state
        ckpt, self._ckpt = self._ckpt, None
        if ckpt is not None:
            if ckpt.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:  # the data order
                raise ConfigError(f"{self.ckpt_path} was written with {ckpt['steps_per_epoch']} "
                                  f"steps per epoch, this config gives {steps_per_epoch}: resume "
                                  "with the same batch_size and subset, or a new out_dir")
            load(ckpt)
            self.step = ckpt["step"]
            print0(f"resumed from {self.ckpt_path} at epoch {self.step // steps_per_epoch}, "
                   f"step {self.step}")
        set_collective_timeout(self.cfg.dist_timeout_s)  # start-up is over
        return ckpt

    def save(self, epochs_done: int, outputs: dict = None, keep: bool = False):
        """Rank 0: the outputs ({path: obj}, tagged with the step) first, then checkpoint.pth
        (keep: also -<epochs_done>.pth): a checkpoint never says a step is done whose outputs
        are not on disk."""
        if not self.dist.main:
            return
        print0(f"saving {self.ckpt_path} at step {self.step} "
               f"(epoch {self.step / self.steps_per_epoch:.2f})")
        for path, obj in (outputs or {}).items():
            save_atomic({**obj, "step": self.step}, path)
        state = {**self._state(), "epoch": epochs_done, "step": self.step,
                 "steps_per_epoch": self.steps_per_epoch, "config": self.record}
        save_atomic(state, self.ckpt_path)
        if keep:
            save_atomic(state, self.path(f"checkpoint-{epochs_done:04d}.pth"))

    # ---- the loop

    def epochs(self) -> range:
        return range(self.step // self.steps_per_epoch, self.cfg.epochs)

    def seen(self, epoch: int) -> int:
        """Micro-batches this rank has already taken in `epoch` (> 0 after a mid-epoch resume)."""
        return (self.step - epoch * self.steps_per_epoch) * self.cfg.accum_steps

    def epoch_batches(self, epoch: int, loader: DataLoader):
        """Position a `train_loader` at this epoch: skip what a resumed epoch has seen, draw this
        epoch's augmentation. -> an iterator of batches."""
        loader.sampler.set_epoch(epoch, skip=self.seen(epoch) * self.micro_batch)
        loader.dataset.set_epoch(epoch)
        return iter(loader)

    def steps(self, epoch: int):
        """Yield the steps of `epoch` left to run, each with its own torch seed (step_seed). Each
        log step: the log line, and a stop signal ends the epoch."""
        end = (epoch + 1) * self.steps_per_epoch
        bar = tqdm(total=self.steps_per_epoch, initial=self.step - epoch * self.steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{self.cfg.epochs}", disable=not self.dist.main,
                   dynamic_ncols=True)
        self._t0 = time.time()
        try:
            while self.step < end:
                torch.manual_seed(step_seed(self.cfg.seed, self.step, self.dist.rank))
                yield self.step
                self.step += 1
                bar.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == end:
                    self._write_log(epoch, bar)
                    if self.stop.should_stop(self.dist.device):
                        self.stopping = True
                        break
        finally:
            bar.close()

    def set_lr(self, optimizer: torch.optim.Optimizer, lr: float):
        """Set this step's lr (times a group's `lr_scale`, e.g. layer decay) and log it."""
        self.lr = lr
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def add(self, values: dict, n: int = 1):
        """Add this step's values ({name: tensor}, each a sum over n micro-batches) to the log."""
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0) + value.detach()
        self._count += n

    def _write_log(self, epoch: int, bar):
        """Reduce the values added since the last line (one host sync) and write the line."""
        count, self._count = self._count, 0
        sums, self._sums = self._sums, {}
        means = all_reduce_mean(torch.stack([v.float() for v in sums.values()]) / count).tolist()
        values = dict(zip(sums, means))
        bad = [(k, v) for k, v in values.items() if not math.isfinite(v)]
        if bad:
            name, value = bad[0]
            raise RunError(f"{name} is {value} at step {self.step} (epoch {epoch + 1}); the last "
                           f"good checkpoint is {self.ckpt_path}: lower the lr or check the data")
        images = count * self.micro_batch * self.dist.world
        ips, self._t0 = images / (time.time() - self._t0), time.time()
        bar.set_postfix({**{k: f"{v:.4f}" for k, v in values.items()}, "lr": f"{self.lr:.2e}",
                         "img_s": f"{ips:.0f}"})
        if self.dist.main:
            log_json(self.log_path, {"epoch": epoch + 1, "step": self.step, **values,
                                     "lr": self.lr, "img_per_s": ips})

    def end_epoch(self, epoch: int):
        """Stopped mid-epoch: save where the run is and exit (128 + signal)."""
        if self.step < (epoch + 1) * self.steps_per_epoch:
            self.save(epoch)
            print0(f"stopped by signal at step {self.step}; rerun the same command to resume")
            self.stop.exit()

    def exit_if_stopped(self, epochs_done: int):
        """A signal arrived in the epoch's last log interval: the epoch is saved; exit now."""
        if self.stopping:
            print0(f"stopped by signal after epoch {epochs_done}; rerun the same command to resume")
            self.stop.exit()
