"""End-to-end pre-training runs on a tiny image folder: DDP equivalence, resume, bad input."""
import functools
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fault_injection import in_parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["dataset=imagefolder", "model=vit_micro", "img_size=16", "patch_size=4",
        "mask_min_patches=2", "num_workers=0", "batch_size=8", "epochs=2", "warmup_epochs=1",
        "log_every=1", "blr=1e-3"]


def run(args, nproc=1, check=True, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "pretrain.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_port=29533", "pretrain.py", *args]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def losses_of(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def encoder_weights(out_dir):
    return torch.load(os.path.join(out_dir, "encoder.pth"), weights_only=True)["model"]


# the one-process run of TINY that two tests compare with (loss=dtm is the default)
ONE_PROCESS = ["keep_every=1", "loss=dtm"]


@pytest.fixture(scope="module")
def one_process_run(tiny_imagefolder, tmp_path_factory):
    """TINY in one process, keeping every epoch's checkpoint: the reference of the two-process
    test and the uninterrupted run of the resume test (one run for both)."""
    out = str(tmp_path_factory.mktemp("one_process") / "run")
    run([*TINY, f"data_path={tiny_imagefolder}", f"out_dir={out}", *ONE_PROCESS])
    return out


def test_two_process_gloo_logs_same_losses_as_one(one_process_run, tiny_imagefolder, tmp_path):
    one, two = one_process_run, str(tmp_path / "two")
    run([*TINY, f"data_path={tiny_imagefolder}", f"out_dir={two}", *ONE_PROCESS], nproc=2)
    a, b = losses_of(one), losses_of(two)
    assert len(a) == len(b) == 8  # 32 images / batch 8 = 4 steps, 2 epochs
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert len(set(round(x, 6) for x in a)) > 1  # the loss moves


def test_resume_equals_uninterrupted(one_process_run, tiny_imagefolder, tmp_path):
    full, resumed = one_process_run, str(tmp_path / "resumed")
    # the interrupted run: only its epoch-1 checkpoint survives; the rerun picks it up
    os.makedirs(resumed)
    shutil.copy(os.path.join(full, "checkpoint-0001.pth"), os.path.join(resumed, "checkpoint.pth"))
    p = run([*TINY, f"data_path={tiny_imagefolder}", f"out_dir={resumed}"])
    assert "resumed from" in p.stdout
    a, b = encoder_weights(full), encoder_weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses_of(resumed) == losses_of(full)[4:]


BAD_INPUT = [
    (["mask_ratoi=0.5"], "unknown config key 'mask_ratoi' (did you mean 'mask_ratio'?)"),
    (["mask_ratio=1.5"], "'mask_ratio' must be in (0, 1)"),
    (["epochs=two"], "'epochs' must be int"),
    (["loss=kmeans"], "config key 'loss' must be one of"),
    (["batch_size=9", "accum_steps=2"], "not divisible by world size 1 x accum_steps 2"),
    (["data_path=/nonexistent"], "image folder '/nonexistent/train' does not exist"),
    (["teacher=checkpoint", "teacher_pretrained=/nonexistent/encoder.pth"],
     "config key 'teacher_pretrained': file '/nonexistent/encoder.pth' does not exist"),
]


@pytest.fixture(scope="module")
def bad_input_runs(tiny_imagefolder, tmp_path_factory):
    """Every case of BAD_INPUT run once, side by side (independent processes), each into its own
    empty out_dir -> {args: (process, its seconds from start to exit)}."""
    def case(out, args):
        t0 = time.time()
        p = run([*TINY, f"data_path={tiny_imagefolder}", f"out_dir={out}", *args], check=False)
        return p, time.time() - t0
    calls = [functools.partial(case, tmp_path_factory.mktemp("bad_input"), args)
             for args, _ in BAD_INPUT]
    return {tuple(args): r for (args, _), r in zip(BAD_INPUT, in_parallel(calls))}


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_one_line_error(bad_input_runs, args, message):
    p, seconds = bad_input_runs[tuple(args)]
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert seconds < 60


def test_checkpoint_teacher_and_token_baselines(tiny_imagefolder, tmp_path):
    """An encoder saved by one run is the `checkpoint` teacher of the next; baselines run."""
    first = str(tmp_path / "first")
    run([*TINY, f"data_path={tiny_imagefolder}", f"out_dir={first}", "epochs=1", "loss=tokenwise"])
    losses = ("fixed", "downsample")
    in_parallel([functools.partial(run, [
        *TINY, f"data_path={tiny_imagefolder}", f"out_dir={tmp_path / loss}", "epochs=1",
        f"loss={loss}", "teacher=checkpoint", f"teacher_pretrained={first}/encoder.pth",
        "distance=smooth_l1"]) for loss in losses])  # two independent runs, side by side
    for loss in losses:
        assert all(x == x for x in losses_of(str(tmp_path / loss)))


CONFIGS = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_parses(name):
    """Each shipped config has only known keys, right types and allowed values."""
    import importlib
    from common import parse_config
    script = next((s for s in ("finetune", "probe") if name.endswith(f"_{s}.yaml")), "pretrain")
    config = importlib.import_module(script).Config
    cfg = parse_config(config, ["--config", os.path.join(ROOT, "configs", name)])
    assert cfg.epochs >= 1


def run_ranks(args_per_rank, port, timeout=120):
    """Start one pretrain.py process per rank as torchrun would (RANK, WORLD_SIZE, ...), each
    with its own arguments, e.g. an out_dir of its own, as on nodes with node-local disks."""
    world = len(args_per_rank)
    procs = []
    for rank, args in enumerate(args_per_rank):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": "0",
               "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "pretrain.py", *args], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p, *p.communicate(timeout=timeout)) for p in procs]


def test_resume_with_an_out_dir_per_node_stops_every_rank_with_one_line(tiny_imagefolder,
                                                                        tmp_path):
    # each rank has its own out_dir (a node-local disk): rank 0's holds the checkpoint after the
    # first run, rank 1's does not. The rerun must not resume rank 0 alone (ranks at different
    # steps hang or mix states): every rank stops, and rank 0 says which rank and which file.
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    args = [[*TINY, f"data_path={tiny_imagefolder}", f"out_dir={d}"] for d in dirs]
    first = run_ranks([[*a, "epochs=1"] for a in args], port=29541)
    assert all(p.returncode == 0 for p, _, _ in first), first[0][2][-2000:]
    assert os.path.isfile(dirs[0] / "checkpoint.pth")
    assert not os.path.exists(dirs[1] / "checkpoint.pth")
    (p0, _, err0), (p1, _, err1) = run_ranks(args, port=29542)
    assert p0.returncode == 3 and p1.returncode == 3, (err0[-2000:], err1[-2000:])
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 cannot find"), err0
    assert str(dirs[1] / "checkpoint.pth") in lines[0] and "shared file system" in lines[0]
    assert "error" not in err1  # rank 0 says it once
    # a checkpoint of another step on rank 1's disk (a copy of an older one) is refused too
    shutil.copy(dirs[0] / "checkpoint.pth", dirs[1] / "checkpoint.pth")
    run_ranks([[*a, "epochs=2"] for a in args], port=29543)  # both at step 8, rank 1's copy at 4
    (p0, _, err0), (p1, _, _) = run_ranks([[*a, "epochs=3"] for a in args], port=29544)
    assert p0.returncode == 3 and p1.returncode == 3
    assert "rank 1 reads step 4" in err0 and "rank 0 resumes from step 8" in err0, err0
