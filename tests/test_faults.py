"""Faults and bad input: kill / SIGTERM / kill-while-saving and resume equal an uninterrupted run
bit for bit; NaN losses, corrupt images and a lost process stop with one clear line and leave
the last good checkpoint as it was."""
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
    out = {}
    for script in ("pretrain.py", "finetune.py", "probe.py"):
        out[script] = str(root / script)
        p = F.run(script, F.tiny_args(script, tiny_imagefolder, out[script], backbone_of(out)))
        assert p.returncode == 0, p.stderr[-2000:]
    return out


def backbone_of(runs: dict) -> str:
    return os.path.join(runs.get("pretrain.py", ""), "encoder.pth")


FAULTS = [(s, f) for s in ("pretrain.py", "finetune.py")
          for f in ("kill-step:6", "kill-save:2", "term-step:7")] + [("probe.py", "term-step:7")]


@pytest.mark.parametrize("script, fault", FAULTS)
def test_interrupted_and_resumed_run_equals_uninterrupted(references, tiny_imagefolder, tmp_path,
                                                          script, fault):
    r = F.interrupted_run(script, tiny_imagefolder, str(tmp_path / "run"), fault,
                          backbone_of(references))
    if fault.startswith("kill"):
        assert r["first_rc"] == -signal.SIGKILL
    else:  # saved at the next log step (mid-epoch: step 7 of 4-step epochs), exit 128 + SIGTERM
        assert r["first_rc"] == 128 + signal.SIGTERM, r["first_out"][-2000:]
        assert "stopped by signal at step 7" in r["first_out"]
    if fault.startswith("kill-save"):
        assert r["leftovers"], "the kill was meant to land in the middle of a checkpoint write"
    assert r["second_rc"] == 0, r["second_out"][-2000:]
    assert "resumed from" in r["second_out"]
    # the resumed run removed the leftover
    assert not [f for f in os.listdir(tmp_path / "run") if ".tmp." in f]
    assert F.same_weights(F.final_weights(script, references[script]),
                          F.final_weights(script, str(tmp_path / "run")))
    assert logged_steps(tmp_path / "run") == logged_steps(references[script])  # replayed: once


def logged_steps(out_dir) -> list:
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line).get("step") for line in f]


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


@pytest.fixture()
def one_epoch_run(one_epoch_template, tmp_path):
    """A fresh copy of one_epoch_template in this test's folder -> (run dir, checkpoint digest)."""
    out = str(tmp_path / "run")
    shutil.copytree(one_epoch_template, out)
    return out, digest(os.path.join(out, "checkpoint.pth"))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_imagefolder, one_epoch_run):
    out, before = one_epoch_run
    p = F.run("pretrain.py", F.tiny_args("pretrain.py", tiny_imagefolder, out), fault="nan-loss:2")
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 3 and len(errors) == 1, p.stderr
    assert errors[0].startswith("error: loss is nan at step 6"), p.stderr
    assert digest(os.path.join(out, "checkpoint.pth")) == before


def test_nan_loss_steps_can_be_skipped(tiny_imagefolder, tmp_path):
    out = str(tmp_path / "run")
    args = F.tiny_args("pretrain.py", tiny_imagefolder, out) + ["skip_nonfinite=1"]
    p = F.run("pretrain.py", args, fault="nan-loss:3")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "non-finite loss at step 2: step skipped (1/1)" in p.stdout
    assert all(torch.isfinite(v).all() for v in F.final_weights("pretrain.py", out).values())
    # one bad step allowed: a second poisoned run of the same kind passes too
    args = F.tiny_args("pretrain.py", tiny_imagefolder, str(tmp_path / "b")) + ["skip_nonfinite=1"]
    p = F.run("pretrain.py", args, fault="nan-loss:3")
    assert p.returncode == 0


@pytest.fixture()
def folder_with_a_corrupt_image(tiny_imagefolder, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(tiny_imagefolder, root)
    bad = os.path.join(root, "train", "class0", "3.png")
    with open(bad, "r+b") as f:  # a truncated file, as an interrupted copy leaves it
        f.truncate(40)
    return root, bad


def test_corrupt_image_is_reported_skipped_and_counted(folder_with_a_corrupt_image, tmp_path):
    root, bad = folder_with_a_corrupt_image
    args = F.tiny_args("pretrain.py", root, str(tmp_path / "run"))
    args += ["epochs=1", "max_corrupt_frac=0.1"]
    p = F.run("pretrain.py", args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"warning: skipping corrupt image {bad}" in p.stderr
    assert "epoch 1: skipped 1 corrupt image(s)" in p.stdout


def test_too_many_corrupt_images_stop_the_run_and_keep_the_checkpoint(folder_with_a_corrupt_image,
                                                                      one_epoch_run):
    root, _ = folder_with_a_corrupt_image
    out, before = one_epoch_run
    p = F.run("pretrain.py", F.tiny_args("pretrain.py", root, out) + ["max_corrupt_frac=0"])
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert p.returncode == 3, p.stderr[-2000:]
    assert errors[0].startswith("error: 1 of 32 images are corrupt"), p.stderr[-2000:]
    assert digest(os.path.join(out, "checkpoint.pth")) == before


@pytest.mark.parametrize("args, message", [
    (["mask_ratoi=0.5"], "unknown config key 'mask_ratoi'"),
    (["batch_size=12"], "checkpoint.pth was written with 4 steps per epoch, this config gives 2"),
    (["data_path=/nonexistent"], "image folder '/nonexistent/train' does not exist"),
])
def test_bad_input_leaves_the_checkpoint_untouched(tiny_imagefolder, one_epoch_run, args, message):
    out, before = one_epoch_run
    # later keys win
    p = F.run("pretrain.py", F.tiny_args("pretrain.py", tiny_imagefolder, out) + args)
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

@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py", "probe.py"])
def test_a_malicious_checkpoint_never_runs_its_code(references, tiny_imagefolder, tmp_path,
                                                    script):
    """A checkpoint.pth whose pickle runs `touch MARKER` when loaded with weights_only=False."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_rundir import malicious_checkpoint
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    malicious_checkpoint(out / "checkpoint.pth", marker)
    p = F.run(script, F.tiny_args(script, tiny_imagefolder, str(out), backbone_of(references)))
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
    assert "No space left on device" in errors[0]
    assert not [f for f in r["files"] if ".tmp." in f], r["files"]


FINAL_OUTPUT = {"finetune.py": "model_timm.pth", "probe.py": "heads.pth"}


@pytest.mark.parametrize("script", ["finetune.py", "probe.py"])
def test_a_failed_final_write_is_not_reported_done_and_the_rerun_writes_it(
        references, tmp_path, script, tiny_imagefolder):
    out, name = str(tmp_path / "run"), FINAL_OUTPUT[script]
    args = F.tiny_args(script, tiny_imagefolder, out, backbone_of(references))
    p = F.run(script, args, fault=f"full-disk:{name}")
    assert p.returncode == 3
    assert f"cannot write '{os.path.join(out, name)}' (No space left" in p.stderr
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["step"] == 8  # the epoch before: the final step 12 is not recorded as done
    p = F.run(script, args)
    assert p.returncode == 0, p.stderr[-2000:]
    assert F.same_weights(F.final_weights(script, references[script]),
                          F.final_weights(script, out))


@pytest.mark.parametrize("script", ["finetune.py", "probe.py"])
def test_a_finished_run_rewrites_a_missing_output(references, tiny_imagefolder, tmp_path, script):
    out, name = str(tmp_path / "run"), FINAL_OUTPUT[script]
    shutil.copytree(references[script], out)
    os.remove(os.path.join(out, name))
    p = F.run(script, F.tiny_args(script, tiny_imagefolder, out, backbone_of(references)))
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"rewrote {os.path.join(out, name)}" in p.stdout
    assert F.same_weights(F.final_weights(script, references[script]),
                          F.final_weights(script, out))


@pytest.mark.parametrize("script, args, message", [
    ("finetune.py", ["model=vit_tiny", "patch_size=2"],
     "was written with model='vit_micro' (now 'vit_tiny'), patch_size=4 (now 2)"),
    ("probe.py", ["block=0", "heads=[mean]"],
     "was written with heads=['cls', 'cls_norm', 'mean', 'abmilp'] (now ['mean']), "
     "block=-1 (now 0)"),
])
def test_a_resume_with_other_model_settings_is_one_line_and_keeps_config_yaml(
        references, tiny_imagefolder, tmp_path, script, args, message):
    out = str(tmp_path / "run")
    shutil.copytree(references[script], out)
    before = digest(os.path.join(out, "config.yaml"))
    p = F.run(script, F.tiny_args(script, tiny_imagefolder, out, backbone_of(references)) + args)
    errors = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(errors) == 1 and message in errors[0], p.stderr[-2000:]
    assert digest(os.path.join(out, "config.yaml")) == before


@pytest.mark.parametrize("script, key", [("finetune.py", "model"), ("probe.py", "heads")])
def test_a_checkpoint_that_does_not_fit_is_one_line(references, tiny_imagefolder, tmp_path, script,
                                                    key):
    out = str(tmp_path / "run")
    shutil.copytree(references[script], out)
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    ckpt[key] = {k: v for k, v in list(ckpt[key].items())[1:]}  # one tensor lost
    torch.save(ckpt, os.path.join(out, "checkpoint.pth"))
    p = F.run(script, F.tiny_args(script, tiny_imagefolder, out, backbone_of(references)))
    errors = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-2000:]
    assert "does not fit this model: missing [" in errors[0]
