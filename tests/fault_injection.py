"""Fault injection: interrupt a tiny run, resume it, compare with an uninterrupted run, bit for bit.

    python tests/fault_injection.py --data DIR     # DIR: an ImageNet-layout folder (train/, val/)
    python tests/fault_injection.py                # makes a tiny random one in a temporary folder

Each fault is injected from inside the process under test, so it lands exactly where asked:
this file, run as `fault_injection.py --inject FAULT SCRIPT ARGS...`, patches two functions and
then runs SCRIPT (pretrain.py or finetune.py) as __main__:

    kill-step:K   SIGKILL itself right after writing the log line of step K (a node dies)
    kill-save:N   on the N-th checkpoint write, write half of the temporary file, then SIGKILL
                  itself (a kill in the middle of saving)
    term-step:K   SIGTERM itself after the log line of step K (SLURM preemption, Ctrl-C): the
                  script must save at the next log step and exit with 143
    nan-loss:K    the K-th call of the distillation loss returns NaN (pretrain.py)
    full-disk:F   writing file F (e.g. model_timm.pth) fails with "No space left on device"

Two faults come from outside: a second run started into the out_dir of a running one
(`concurrent_run`: it must stop at once, naming the holder), and a run whose out_dir is a small
tmpfs that fills up (`full_disk_run`: one line, exit 3, no temp file left; skipped with the
reason where `mount -t tmpfs` is not allowed).

Then the same command is rerun without a fault until it finishes; the final encoder must equal
the uninterrupted run's. The tests in test_faults.py call `interrupted_run` below.
"""
import argparse
import errno
import json
import os
import random
import runpy
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a tiny run: 32 images of 16 px, batch 8 -> 4 steps per epoch; a log line (and SIGTERM check)
# every step
TINY = {
    "pretrain.py": ["dataset=imagefolder", "model=vit_micro", "img_size=16", "patch_size=4",
                    "mask_min_patches=2", "num_workers=0", "batch_size=8", "epochs=3",
                    "warmup_epochs=1", "log_every=1", "blr=1e-3", "drop_path=0.1", "loss=dtm",
                    "teacher=ema"],
    "finetune.py": ["dataset=imagefolder", "model=vit_micro", "img_size=16", "patch_size=4",
                    "init=", "num_workers=0", "batch_size=8", "epochs=3", "warmup_epochs=1",
                    "log_every=1", "blr=1e-3", "drop_path=0.1"],
    # probe.py also needs backbone=ENCODER; "never" caches: the streaming path, with its loader
    "probe.py": ["dataset=imagefolder", "num_workers=0", "batch_size=8", "epochs=3",
                 "warmup_epochs=1", "optimizer=sgd", "blr=0.5", "log_every=1", "eval_every=5",
                 "knn=[]", "cache=never"],
}
FINAL = {"pretrain.py": "encoder.pth", "finetune.py": "model_timm.pth", "probe.py": "heads.pth"}


# -----------------------------------------------------------------------------
# Inside the process under test

def inject(fault: str):
    """Patch common.log_json / torch.save so that the process hurts itself at the chosen point."""
    import torch
    import common
    kind, at = fault.split(":")
    at = at if kind == "full-disk" else int(at)
    if kind in ("kill-step", "term-step"):
        sig = signal.SIGKILL if kind == "kill-step" else signal.SIGTERM
        log_json = common.log_json

        def log_and_signal(path, record):
            log_json(path, record)
            if record.get("step") == at and "lr" in record:  # a training-step line
                os.kill(os.getpid(), sig)
        common.log_json = log_and_signal
    elif kind == "kill-save":
        save, count = torch.save, [0]

        def save_half_and_die(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            temp_checkpoint = isinstance(f, str) and os.path.basename(f) == "checkpoint.pth.tmp"
            if temp_checkpoint:
                count[0] += 1
                if count[0] == at:
                    with open(f, "r+b") as fh:
                        fh.truncate(os.path.getsize(f) // 2)
                    os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_half_and_die
    elif kind == "nan-loss":
        import losses
        calls = [0]

        def poisoned(loss_fn):
            def wrapper(*args, **kwargs):
                calls[0] += 1
                loss = loss_fn(*args, **kwargs)
                return loss * float("nan") if calls[0] == at else loss
            return wrapper
        losses.dtm_loss = poisoned(losses.dtm_loss)
        losses.tokenwise_loss = poisoned(losses.tokenwise_loss)
    elif kind == "full-disk":
        save = torch.save

        def save_or_fail(obj, f, *args, **kwargs):
            if isinstance(f, str) and os.path.basename(f) == f"{at}.tmp":
                with open(f, "wb") as fh:  # a partial file, then the disk is full
                    fh.write(b"PK")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f)
            save(obj, f, *args, **kwargs)
        torch.save = save_or_fail
    else:
        raise SystemExit(f"unknown fault '{fault}'")


# -----------------------------------------------------------------------------
# Driving runs from outside

def run(script: str, args: list, fault: str = "",
        timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if fault:
        cmd = [sys.executable, os.path.abspath(__file__), "--inject", fault, script]
    else:
        cmd = [sys.executable, script]
    return subprocess.run(cmd + args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def in_parallel(calls: list, workers: int = 0) -> list:
    """[call() for call in calls], `workers` at a time (default: the CPU cores, 2 to 4).

    For independent runs of the scripts (each call starts its own processes, one thread each):
    a run spends most of its few seconds importing torch, on one core, so running them side by
    side instead of in turn keeps every core busy. Same commands, same results, in order."""
    from concurrent.futures import ThreadPoolExecutor
    workers = workers or min(4, max(2, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda call: call(), calls))


def tiny_args(script: str, data_dir: str, out_dir: str, backbone: str = "") -> list:
    extra = [f"backbone={backbone}"] if script == "probe.py" else []
    return [*TINY[script], f"data_path={data_dir}", f"out_dir={out_dir}", *extra]


def interrupted_run(script: str, data_dir: str, out_dir: str, fault: str,
                    backbone: str = "") -> dict:
    """Run `script` with `fault`, then rerun until it finishes. -> what happened, for the caller
    to check."""
    first = run(script, tiny_args(script, data_dir, out_dir, backbone), fault)
    leftovers = []
    if os.path.isdir(out_dir):
        leftovers = sorted(f for f in os.listdir(out_dir) if f.endswith(".tmp"))
    second = run(script, tiny_args(script, data_dir, out_dir, backbone))
    return {"fault": fault, "first_rc": first.returncode, "first_out": first.stdout + first.stderr,
            "leftovers": leftovers, "second_rc": second.returncode,
            "second_out": second.stdout + second.stderr}


def concurrent_run(script: str, data_dir: str, out_dir: str, backbone: str = "") -> dict:
    """Start a long run, then a second one into the same out_dir while the first trains."""
    args = tiny_args(script, data_dir, out_dir, backbone) + ["epochs=200"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        log = os.path.join(out_dir, "log.jsonl")
        deadline = time.time() + 120
        while not (os.path.isfile(log) and os.path.getsize(log) > 0):
            assert time.time() < deadline and first.poll() is None, "the first run did not start"
            time.sleep(0.1)
        t0 = time.time()
        second = run(script, args)
        seconds = time.time() - t0
        first_alive = first.poll() is None
        first.terminate()  # SIGTERM: it saves, exits 143 and releases the lock
        first.wait(timeout=120)
    finally:
        first.kill()
    return {"second_rc": second.returncode, "second_err": second.stderr, "second_s": seconds,
            "first_pid": first.pid, "first_alive": first_alive, "first_rc": first.returncode,
            "lock_left": lock_held(out_dir)}


def lock_held(out_dir: str) -> bool:
    """Does some process still hold out_dir's lock (an fcntl.flock on out_dir/.lock)?"""
    import fcntl
    with open(os.path.join(out_dir, ".lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def full_disk_run(script: str, data_dir: str, out_dir: str, backbone: str = "",
                  size: str = "256k"):
    """Run with out_dir on a tmpfs of `size`: -> what happened, or a string: why it was skipped."""
    os.makedirs(out_dir, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", out_dir],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        return f"cannot mount a tmpfs here ({mount.stderr.strip() or 'needs root'})"
    try:
        p = run(script, tiny_args(script, data_dir, out_dir, backbone))
        return {"rc": p.returncode, "stderr": p.stderr, "files": sorted(os.listdir(out_dir))}
    finally:
        subprocess.run(["umount", out_dir], check=True)


def final_weights(script: str, out_dir: str) -> dict:
    import torch
    state = torch.load(os.path.join(out_dir, FINAL[script]), map_location="cpu", weights_only=True)
    return state["heads"] if script == "probe.py" else state["model"]


def same_weights(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def make_tiny_folder(root: str) -> str:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("val", 8)):
        for c in range(2):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
            for i in range(count // 2):
                pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
                pixels[..., c] //= 4
                Image.fromarray(pixels).save(os.path.join(root, split, f"class{c}", f"{i}.png"))
    return root


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="",
                   help="an ImageNet-layout folder; default: a tiny random one")
    p.add_argument("--seed", type=int, default=0, help="picks the random steps to kill at")
    args = p.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data or make_tiny_folder(os.path.join(tmp, "data"))
        backbone = os.path.join(tmp, "pretrain.py", "reference", "encoder.pth")
        for script in ("pretrain.py", "finetune.py", "probe.py"):
            ref = os.path.join(tmp, script, "reference")
            assert run(script, tiny_args(script, data_dir, ref, backbone)).returncode == 0
            total = 12  # 3 epochs x 4 steps
            faults = (f"kill-step:{rng.randint(1, total - 1)}", "kill-save:2",
                      f"term-step:{rng.randint(1, total - 1)}")
            for fault in faults:
                out = os.path.join(tmp, script, fault.replace(":", "_"))
                r = interrupted_run(script, data_dir, out, fault, backbone)
                equal = r["second_rc"] == 0 and same_weights(final_weights(script, ref),
                                                             final_weights(script, out))
                print(json.dumps({"script": script, "fault": fault, "exit_code": r["first_rc"],
                                  "leftover_temp_files": r["leftovers"],
                                  "resumed_exit_code": r["second_rc"],
                                  "final_weights_equal": equal}))
            c = concurrent_run(script, data_dir, os.path.join(tmp, script, "concurrent"), backbone)
            print(json.dumps({"script": script, "fault": "concurrent",
                              "second_exit_code": c["second_rc"],
                              "second_error": c["second_err"].strip()[-300:],
                              "first_exit_code": c["first_rc"], "lock_left": c["lock_left"]}))
            d = full_disk_run(script, data_dir, os.path.join(tmp, script, "full_disk"), backbone)
            report = {"skipped": d} if isinstance(d, str) else \
                {"exit_code": d["rc"], "error": d["stderr"].strip()[-300:],
                 "files_left": d["files"]}
            print(json.dumps({"script": script, "fault": "full-disk", **report}))


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--inject":
        fault, script = sys.argv[2], sys.argv[3]
        sys.argv = [script, *sys.argv[4:]]
        sys.path.insert(0, ROOT)
        inject(fault)
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    else:
        main()
