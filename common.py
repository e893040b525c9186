"""Plumbing shared by pretrain.py, finetune.py and probe.py: config, DDP, schedule, checkpoints.

Nothing about the methods lives here; read the stage scripts for that.
"""
import dataclasses
import difflib
import json
import math
import itertools
import os
import signal
import sys
import typing
from datetime import timedelta

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm


class ConfigError(ValueError):
    """A bad config key or value: the scripts print it as one line and exit with code 2."""


# -----------------------------------------------------------------------------
# Config: dataclass defaults < --config file.yaml < key=value on the command line

def parse_config(cls, argv):
    """Build the config dataclass `cls` from argv = ['--config', 'x.yaml', 'key=value', ...]."""
    values = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--config" or arg.startswith("--config="):
            path = arg.split("=", 1)[1] if "=" in arg else (args.pop(0) if args else "")
            values.update(_read_yaml(path))
        elif "=" in arg and not arg.startswith("-"):
            key, text = arg.split("=", 1)
            values[key] = yaml.safe_load(text) if text != "" else ""
        else:
            raise ConfigError(f"cannot read argument '{arg}': use --config FILE.yaml and key=value overrides")
    return make_config(cls, values)


def _read_yaml(path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of key: value")
    return data


def make_config(cls, values: dict):
    """Check every key and type against the dataclass, then run its `validate()` if any."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}; see the Config class for the allowed keys")
        kwargs[key] = _check_type(key, value, hints[key])
    cfg = cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _check_type(key, value, kind):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind in (int, float, str, bool):
        if type(value) is not kind:
            raise ConfigError(f"config key '{key}' must be {kind.__name__}, got {value!r}")
        return value
    origin = typing.get_origin(kind)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = set(typing.get_args(kind)) - {Ellipsis} or {object}
        return origin(_check_type(key, v, item) if item in (int, float, str, bool) else v for v in value)
    return value


def check_choice(key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


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


def setup_distributed(device: str = "auto", timeout_s: int = 1800) -> Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, gloo on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible: use device=cpu or device=auto")
    if "RANK" not in os.environ:
        return Dist(device=torch.device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, local, torch.device(device, local) if device == "cuda" else torch.device("cpu"))


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
    return t


def split_batch(global_batch: int, world: int, accum_steps: int) -> int:
    """Per-process micro-batch = global batch / (world size x accumulation steps)."""
    if global_batch % (world * accum_steps):
        raise ConfigError(f"batch_size {global_batch} is not divisible by world size {world} x "
                          f"accum_steps {accum_steps}: change batch_size or accum_steps")
    return global_batch // (world * accum_steps)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation shards without padding: rank r takes indices r, r + world, ... so the counts
    summed over ranks cover every sample exactly once (DistributedSampler would repeat some)."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = list(range(rank, size, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# -----------------------------------------------------------------------------
# Optimisation helpers

def cosine_lr(step: float, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Linear warmup for `warmup` steps, then half-cosine from base_lr to min_lr (MAE/BEiT)."""
    if step < warmup:
        return base_lr * step / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


NO_DECAY = ("cls_token", "mask_token", "pos_embed", "relative_position_bias_table")


def param_groups(model: torch.nn.Module, weight_decay: float):
    """No weight decay on norms, biases, tokens and position tables (BEiT/MAE convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(key in name for key in NO_DECAY)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# -----------------------------------------------------------------------------
# Checkpoints and logs

def save_atomic(obj, path: str):
    """torch.save to a temporary file, then rename: a kill mid-write leaves the old file intact."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def remove_stale_temp_files(out_dir: str):
    """Delete the half-written `*.tmp.PID` files a killed save_atomic leaves (the real files are intact)."""
    for name in os.listdir(out_dir):
        if ".tmp." in name:
            os.remove(os.path.join(out_dir, name))
            print0(f"removed {name}, left by a run killed while saving")


def load_checkpoint(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise RuntimeError(f"cannot read checkpoint '{path}' ({type(e).__name__}: {e}); "
                           "delete it to start over or point resume= at another file") from e


def log_json(path: str, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
             "NCCL communicator was aborted", "watchdog")


def run_main(main):
    """Run a stage's main(); bad input becomes one line on stderr and exit code 2, a failure
    during the run (NaN loss, bad data, a lost process, an unreadable file) exit code 3."""
    try:
        main(sys.argv[1:])
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e), 2)
    except RuntimeError as e:
        msg = str(e).strip()
        if isinstance(e, (NonFiniteLoss, DataError)) or "cannot be downloaded" in msg or "cannot read checkpoint" in msg:
            _fail(msg, 3)
        if dist.is_initialized() and (isinstance(e, dist.DistError) or any(s in msg for s in LOST_PEER)):
            first = msg.splitlines()[0] if msg else type(e).__name__
            _fail(f"rank {dist.get_rank()} lost contact with another process ({first[:200]}): a process died or "
                  "a node failed; rerun the same command to resume from the last checkpoint", 3)
        raise
    finally:
        cleanup_distributed()


def _fail(message: str, code: int):
    for bar in list(getattr(tqdm, "_instances", ())):  # end open progress bars: the error gets its own line
        bar.close()
    print(f"error: {message}", file=sys.stderr, flush=True)
    if code == 3 and dist.is_initialized():  # peers may be gone: do not wait for them in a barrier
        os._exit(code)
    cleanup_distributed()
    sys.exit(code)


class NonFiniteLoss(RuntimeError):
    pass


class DataError(RuntimeError):
    pass


def check_corrupt(count: int, data_size: int, max_frac: float, device) -> int:
    """Sum the corrupt images skipped by every rank; stop all ranks when more than max_frac of the
    data set is corrupt. Every rank calls it at the same step (a collective)."""
    total = int(all_reduce_sum(torch.tensor(float(count), device=device)).item())
    if total > max_frac * data_size:
        raise DataError(f"{total} of {data_size} images are corrupt (more than max_corrupt_frac={max_frac}); "
                        "their paths are printed above: fix or remove them, or raise max_corrupt_frac")
    return total


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed for one optimisation step (drop path, ...): a function of (seed, step, rank),
    so a resumed run draws exactly what an uninterrupted one draws, without saving RNG states."""
    return ((seed * 1_000_003 + step) * 1009 + rank) % (2 ** 63)


# -----------------------------------------------------------------------------
# Preemption: SIGTERM (SLURM, torchrun) and SIGINT (Ctrl-C) ask for a checkpoint and a clean exit

class StopRequest:
    """Catch SIGTERM/SIGINT; the loop asks `should_stop()` at log steps, saves a checkpoint, then
    calls `exit()`: exit code 128 + signal (143 SIGTERM, 130 SIGINT), so `pretrain && finetune`
    does not go on with an unfinished encoder, and SLURM requeue / a rerun resumes.

    All ranks must stop at the same step, so the flag is reduced across ranks (max) when asked.
    """

    def __init__(self):
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"signal {signal.Signals(signum).name}: saving a checkpoint at the next log step", flush=True)

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
    """DataLoader worker_init_fn: SLURM and Ctrl-C signal every process of the job; the loader
    workers leave SIGTERM/SIGINT to the main process, which saves and exits (they follow it)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SkipSampler(torch.utils.data.Sampler):
    """Wrap a (distributed) sampler and skip its first `skip` indices in the current epoch:
    resuming mid-epoch continues with exactly the samples an uninterrupted run would see."""

    def __init__(self, sampler):
        self.sampler, self.skip = sampler, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.sampler.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self):
        return len(self.sampler) - self.skip
