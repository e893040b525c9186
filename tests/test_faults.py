"""Faults and bad input: kill / SIGTERM / kill-while-saving and resume equal an uninterrupted run
bit for bit; NaN losses, a full disk and a lost process stop with one clear line and leave the
last good checkpoint as it was; a corrupt image is skipped with its path."""
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_injection as F  # noqa: E402


@pytest.fixture(scope="module")
def references(tiny_imagefolder, tmp_path_factory):
    """The uninterrupted tiny runs of pretrain.py, finetune.py and probe.py (on pretrain's
    encoder)."""
    root = tmp_path_factory.mktemp("reference")
    out = {script: str(root / script) for script in ("pretrain.py", "finetune.py", "probe.py")}
    # pretrain.py and finetune.py side by side; then probe.py, on pretrain's encoder
    for scripts in (("pretrain.py", "finetune.py"), ("probe.py",)):
        done = side_by_side({s: (s, F.tiny_args(s, tiny_imagefolder, out[s], backbone_of(out)))
                             for s in scripts})
        for p in done.values():
            assert p.returncode == 0, p.stderr[-2000:]
    return out


def backbone_of(runs: dict) -> str:
    return os.path.join(runs.get("pretrain.py", ""), "encoder.pth")


def side_by_side(cases: dict) -> dict:
    """{key: F.run's arguments (script, args[, fault])} -> {key: the finished process}.
    Independent runs, started side by side (F.in_parallel) instead of in turn."""
    keys = list(cases)
    done = F.in_parallel([functools.partial(F.run, *cases[key]) for key in keys])
    return dict(zip(keys, done))


FAULTS = [(s, f) for s in ("pretrain.py", "finetune.py")
          for f in ("kill-step:6", "kill-save:2", "term-step:7")] + [("probe.py", "term-step:7")]


@pytest.fixture(scope="module")
def interrupted_runs(references, tiny_imagefolder, tmp_path_factory):
    """Every case of FAULTS run with its fault, then rerun to the end (F.interrupted_run); the
    cases side by side -> {(script, fault): (what happened, the run's folder)}."""
    folders = {case: tmp_path_factory.mktemp("interrupted") / "run" for case in FAULTS}
    calls = [functools.partial(F.interrupted_run, script, tiny_imagefolder,
                               str(folders[script, fault]), fault, backbone_of(references))
             for script, fault in FAULTS]
    return {case: (r, folders[case]) for case, r in zip(FAULTS, F.in_parallel(calls))}


@pytest.mark.parametrize("script, fault", FAULTS)
def test_interrupted_and_resumed_run_equals_uninterrupted(interrupted_runs, references, script,
                                                          fault):
    r, run_dir = interrupted_runs[script, fault]
    if fault.startswith("kill"):
        assert r["first_rc"] == -signal.SIGKILL
    else:  # saved at the next log step (mid-epoch: step 7 of 4-step epochs), exit 128 + SIGTERM
        assert r["first_rc"] == 128 + signal.SIGTERM, r["first_out"][-2000:]
        assert "stopped by signal at step 7" in r["first_out"]
    if fault.startswith("kill-save"):
        assert r["leftovers"], "the kill was meant to land in the middle of a checkpoint write"
    assert r["second_rc"] == 0, r["second_out"][-2000:]
    assert "resumed from" in r["second_out"]
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]  # replaced by a later save
    assert F.same_weights(F.final_weights(script, references[script]),
                          F.final_weights(script, str(run_dir)))
    # every step logged (the steps a killed run logged after its checkpoint are logged again)
    assert logged_steps(run_dir) == logged_steps(references[script])


def logged_steps(out_dir) -> list:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return sorted({json.loads(line).get("step", 0) for line in f})


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def one_epoch_template(tiny_imagefolder, tmp_path_factory):
    """A run directory whose checkpoint.pth holds epoch 1 of 3, as an interrupted run leaves it.
    Made once per module; every test gets its own copy (one_epoch_run)."""
    out = str(tmp_path_factory.mktemp("one_epoch") / "run")
    args = F.tiny_args("pretrain.py", tiny_imagefolder, out) + ["epochs=1"]
    assert F.run("pretrain.py", args).returncode == 0
    ckpt = os.path.join(out, "checkpoint.pth")
    state = torch.load(ckpt, weights_only=False)
    state["config"]["epochs"] = 3  # noqa: the run was cut after epoch 1 of 3
    torch.save(state, ckpt)
    return out


def copy_of(template: str, folder) -> tuple:
    """A fresh copy of a run directory in `folder` -> (run dir, its checkpoint's digest)."""
    out = str(folder / "run")
    shutil.copytree(template, out)
    return out, digest(os.path.join(out, "checkpoint.pth"))


@pytest.fixture()
def one_epoch_run(one_epoch_template, tmp_path):
    """A fresh copy of one_epoch_template in this test's folder -> (run dir, checkpoint digest)."""
    return copy_of(one_epoch_template, tmp_path)


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_imagefolder, one_epoch_run):
    out, before = one_epoch_run
    p = F.run("pretrain.py", F.tiny_args("pretrain.py", tiny_imagefolder, out), fault="nan-loss:2")
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 3 and len(errors) == 1, p.stderr
    assert errors[0].startswith("error: loss is nan at step 6"), p.stderr
    assert digest(os.path.join(out, "checkpoint.pth")) == before


@pytest.fixture()
def folder_with_a_corrupt_image(tiny_imagefolder, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(tiny_imagefolder, root)
    bad = os.path.join(root, "train", "class0", "3.png")
    with open(bad, "r+b") as f:  # a truncated file, as an interrupted copy leaves it
        f.truncate(40)
    return root, bad


def test_a_corrupt_image_is_reported_with_its_path_and_skipped(folder_with_a_corrupt_image,
                                                               tmp_path):
    root, bad = folder_with_a_corrupt_image
    p = F.run("pretrain.py", F.tiny_args("pretrain.py", root, str(tmp_path / "run")) + ["epochs=1"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"warning: skipping corrupt image {bad}" in p.stderr


BAD_INPUT = [
    (["mask_ratoi=0.5"], "unknown config key 'mask_ratoi'"),
    (["batch_size=12"], "checkpoint.pth was written with 4 steps per epoch, this config gives 2"),
    (["data_path=/nonexistent"], "image folder '/nonexistent/train' does not exist"),
]


@pytest.fixture(scope="module")
def bad_input_runs(one_epoch_template, tiny_imagefolder, tmp_path_factory):
    """Each case of BAD_INPUT resumed on its own copy of one_epoch_template, side by side
    -> {args: (run dir, checkpoint digest before, process)}."""
    copies = {tuple(args): copy_of(one_epoch_template, tmp_path_factory.mktemp("bad_input"))
              for args, _ in BAD_INPUT}
    # later keys win
    done = side_by_side({args: ("pretrain.py", F.tiny_args("pretrain.py", tiny_imagefolder, out)
                                + list(args)) for args, (out, _) in copies.items()})
    return {args: (*copies[args], done[args]) for args in copies}


@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_leaves_the_checkpoint_untouched(bad_input_runs, args, message):
    out, before, p = bad_input_runs[tuple(args)]
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert digest(os.path.join(out, "checkpoint.pth")) == before


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_losing_one_of_two_processes_fails_the_other_with_a_clear_message(tiny_imagefolder,
                                                                          tmp_path, how):
    """rank 1 dies (SIGKILL: its sockets close) or hangs (SIGSTOP: only the timeout can tell)."""
    out = str(tmp_path / "run")
    args = F.tiny_args("pretrain.py", tiny_imagefolder, out) + ["epochs=500", "dist_timeout_s=10"]
    port = str(29600 + (os.getpid() + (how == "frozen")) % 300)
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "pretrain.py", *args], cwd=F.ROOT, env=env,
                                      text=True, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    try:
        log = os.path.join(out, "log.jsonl")
        deadline = time.time() + 120
        while not (os.path.exists(log) and len(open(log).readlines()) >= 3):
            started = time.time() < deadline and procs[0].poll() is None
            assert started, "the 2-process run did not start"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=90)
        assert procs[0].returncode == 3
        assert "error: rank 0 lost contact with another process" in err, err[-2000:]
        assert "rerun the same command" in err, err[-2000:]
        assert time.time() - t0 < 60
    finally:
        for p in procs:
            p.kill()
            p.wait()


# -----------------------------------------------------------------------------
# Run directories: no code from a checkpoint, one run per folder, outputs before "done"

SCRIPTS = ["pretrain.py", "finetune.py", "probe.py"]


@pytest.fixture(scope="module")
def malicious_runs(references, tiny_imagefolder, tmp_path_factory):
    """Each script started on a checkpoint.pth whose pickle runs `touch MARKER` when loaded with
    weights_only=False, the three side by side -> {script: (run dir, marker, process)}."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_rundir import malicious_checkpoint
    folders, cases = {}, {}
    for script in SCRIPTS:
        root = tmp_path_factory.mktemp("malicious")
        out, marker = root / "run", root / "marker"
        out.mkdir()
        malicious_checkpoint(out / "checkpoint.pth", marker)
        folders[script] = (out, marker)
        cases[script] = (script, F.tiny_args(script, tiny_imagefolder, str(out),
                                             backbone_of(references)))
    done = side_by_side(cases)
    return {script: (*folders[script], done[script]) for script in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_malicious_checkpoint_never_runs_its_code(malicious_runs, script):
    """A checkpoint.pth whose pickle runs `touch MARKER` when loaded with weights_only=False."""
    out, marker, p = malicious_runs[script]
    errors = p.stderr.strip().splitlines()
    assert p.returncode == 3 and len(errors) == 1, p.stderr[-2000:]
    path = out / "checkpoint.pth"
    assert errors[0].startswith(f"error: cannot read checkpoint '{path}': it holds Python objects")
    assert not marker.exists()


def test_a_second_run_into_a_busy_out_dir_stops_at_once(tiny_imagefolder, tmp_path):
    r = F.concurrent_run("finetune.py", tiny_imagefolder, str(tmp_path / "run"))
    errors = r["second_err"].strip().splitlines()
    assert r["second_rc"] == 2 and len(errors) == 1, r["second_err"][-2000:]
    out = tmp_path / "run"
    assert errors[0].startswith(f"error: out_dir '{out}' is in use by PID {r['first_pid']} ")
    assert r["second_s"] < 30 and r["first_alive"]  # stopped before any work; the first went on
    assert r["first_rc"] == 128 + signal.SIGTERM and not r["lock_left"]  # released on the way out


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tiny_imagefolder, tmp_path):
    r = F.full_disk_run("finetune.py", tiny_imagefolder, str(tmp_path / "run"))
    if isinstance(r, str):
        pytest.skip(r)
    errors = [line for line in r["stderr"].splitlines() if line.startswith("error: ")]
    assert r["rc"] == 3 and len(errors) == 1, r["stderr"][-2000:]
    assert errors[0].startswith("error: cannot write '") and "disk is full" in errors[0]
    assert not [f for f in r["files"] if f.endswith(".tmp")], r["files"]


FINAL_OUTPUT = {"finetune.py": "model_timm.pth", "probe.py": "heads.pth"}


@pytest.fixture(scope="module")
def failed_final_write_runs(references, tiny_imagefolder, tmp_path_factory):
    """Each script of FINAL_OUTPUT run with a full disk when it writes its final output, its
    checkpoint's step read, then rerun without the fault; the two scripts side by side
    -> {script: (run dir, first process, the checkpoint's step after it, second process)}."""
    def case(script, out):
        args = F.tiny_args(script, tiny_imagefolder, out, backbone_of(references))
        first = F.run(script, args, fault=f"full-disk:{FINAL_OUTPUT[script]}")
        path = os.path.join(out, "checkpoint.pth")
        step = torch.load(path, weights_only=True)["step"] if os.path.isfile(path) else None
        return out, first, step, F.run(script, args)
    calls = [functools.partial(case, script, str(tmp_path_factory.mktemp("final_write") / "run"))
             for script in FINAL_OUTPUT]
    return dict(zip(FINAL_OUTPUT, F.in_parallel(calls)))


@pytest.mark.parametrize("script", ["finetune.py", "probe.py"])
def test_a_failed_final_write_is_not_reported_done_and_the_rerun_writes_it(
        failed_final_write_runs, references, script):
    out, p, step, rerun = failed_final_write_runs[script]
    name = FINAL_OUTPUT[script]
    assert p.returncode == 3
    assert f"cannot write '{os.path.join(out, name)}' (No space left" in p.stderr
    assert step == 8  # the epoch before: the final step 12 is not recorded as done
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert F.same_weights(F.final_weights(script, references[script]),
                          F.final_weights(script, out))


def copies_of_references(references, tiny_imagefolder, tmp_path_factory, cases: dict,
                         change) -> dict:
    """For each case {key: (script, extra args)}: a copy of the script's reference run changed
    by change(run dir, key), then the script resumed on it; all side by side
    -> {key: (run dir, process)}."""
    outs = {}
    for key, (script, _) in cases.items():
        outs[key] = str(tmp_path_factory.mktemp("copy") / "run")
        shutil.copytree(references[script], outs[key])
        change(outs[key], key)
    done = side_by_side({key: (script, F.tiny_args(script, tiny_imagefolder, outs[key],
                                                   backbone_of(references)) + extra)
                         for key, (script, extra) in cases.items()})
    return {key: (outs[key], done[key]) for key in cases}


OTHER_SETTINGS = [
    ("finetune.py", ["model=vit_tiny", "patch_size=2"],
     "was written with model='vit_micro' (now 'vit_tiny'), patch_size=4 (now 2)"),
    ("probe.py", ["block=0", "heads=[mean]"],
     "was written with heads=['cls', 'cls_norm', 'mean', 'abmilp'] (now ['mean']), "
     "block=-1 (now 0)"),
]


@pytest.fixture(scope="module")
def other_settings_runs(references, tiny_imagefolder, tmp_path_factory):
    """Each case of OTHER_SETTINGS resumed on a copy of its script's reference run
    -> {(script, args): (run dir, config.yaml's digest before, process)}."""
    before = {}

    def keep_digest(out, key):
        before[key] = digest(os.path.join(out, "config.yaml"))
    cases = {(script, tuple(args)): (script, args) for script, args, _ in OTHER_SETTINGS}
    done = copies_of_references(references, tiny_imagefolder, tmp_path_factory, cases,
                                keep_digest)
    return {key: (out, before[key], p) for key, (out, p) in done.items()}


@pytest.mark.parametrize("script, args, message", OTHER_SETTINGS)
def test_a_resume_with_other_model_settings_is_one_line_and_keeps_config_yaml(
        other_settings_runs, script, args, message):
    out, before, p = other_settings_runs[script, tuple(args)]
    errors = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(errors) == 1 and message in errors[0], p.stderr[-2000:]
    assert digest(os.path.join(out, "config.yaml")) == before


NOT_FITTING = [("finetune.py", "model"), ("probe.py", "heads")]


@pytest.fixture(scope="module")
def not_fitting_runs(references, tiny_imagefolder, tmp_path_factory):
    """Each case of NOT_FITTING resumed on a copy of its script's reference run whose
    checkpoint lost one tensor of `key` -> {(script, key): (run dir, process)}."""
    def lose_one_tensor(out, case):
        key = case[1]
        ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
        ckpt[key] = {k: v for k, v in list(ckpt[key].items())[1:]}  # one tensor lost
        torch.save(ckpt, os.path.join(out, "checkpoint.pth"))
    return copies_of_references(references, tiny_imagefolder, tmp_path_factory,
                                {case: (case[0], []) for case in NOT_FITTING}, lose_one_tensor)


@pytest.mark.parametrize("script, key", NOT_FITTING)
def test_a_checkpoint_that_does_not_fit_is_one_line(not_fitting_runs, script, key):
    _, p = not_fitting_runs[script, key]
    errors = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-2000:]
    assert "does not fit this model: missing [" in errors[0]


