"""Run directories (common.py): weights_only loads, the out_dir lock, atomic saves, outputs
before the checkpoint, the resume check, and config errors as one line."""
import errno
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

import common
import finetune
import pretrain
import probe
from common import ConfigError, RunError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Payload:
    """Unpickling this runs `touch MARKER`: what a hostile checkpoint.pth would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious_checkpoint(path, marker):
    """A checkpoint that looks valid, with the payload hidden in one value."""
    state = {"model": {}, "optimizer": {}, "step": 0, "config": {}, "extra": Payload(marker)}
    torch.save(state, path)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -----------------------------------------------------------------------------
# Loading files: tensors and plain values only

def test_malicious_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    malicious_checkpoint(tmp_path / "checkpoint.pth", marker)
    with pytest.raises(RunError, match="Python objects other than tensors"):
        common.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    with pytest.raises(ConfigError, match="config key 'init'.*Python objects other than tensors"):
        common.read_weights(str(tmp_path / "checkpoint.pth"), "init")
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    ("random", "not a file written by torch.save|truncated or not a torch file"),
    ("truncated", "truncated or not a torch file"),
    ("checkpoint", "is a training checkpoint, not weights"),
])
def test_unreadable_weights_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "w.pth"
    if content == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:3000])
    elif content == "checkpoint":
        torch.save({"model": {}, "optimizer": {}, "step": 4, "config": {}}, path)
    else:
        path.write_bytes(os.urandom(2000))
    with pytest.raises(ConfigError, match=message):
        common.read_weights(str(path), "backbone")


def test_load_state_mismatch_names_the_keys():
    a, b = torch.nn.Linear(3, 4), torch.nn.Linear(3, 5)
    with pytest.raises(ConfigError, match=r"'ckpt' does not fit this model: missing \[\], "
                                          r"unexpected \[\], wrong shape \['weight', 'bias'\]"):
        common.load_state(a, b.state_dict(), "ckpt")


# -----------------------------------------------------------------------------
# The lock: one run per out_dir

HOLD = ("import sys, time; sys.path.insert(0, {root!r}); import common; "
        "common.lock_run_dir({d!r}); print('locked', flush=True); {then}")


def holder(out_dir, then="time.sleep(60)"):
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(root=ROOT, d=str(out_dir), then=then)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_busy_out_dir_is_refused_naming_the_holder(tmp_path):
    p = holder(tmp_path)
    try:
        with pytest.raises(ConfigError) as e:
            common.lock_run_dir(str(tmp_path))
        msg = str(e.value)
        assert f"is in use by PID {p.pid} on {socket.gethostname()}" in msg and "\n" not in msg
    finally:
        p.kill()
        p.wait()


def take_and_release(out_dir) -> str:
    """Take the lock in this process, then let it go: -> the holder the lock file names."""
    common.lock_run_dir(str(out_dir))
    common._held_locks.pop().close()  # closing the file drops the flock
    return (out_dir / ".lock").read_text().strip()


@pytest.mark.parametrize("then", ["pass", "raise ValueError('boom')", "sys.exit(143)",
                                  "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
def test_the_lock_ends_with_its_process_however_it_ends(tmp_path, then):
    # the kernel drops a flock when its process ends, SIGKILL included: no stale lock, and the
    # file left behind (naming the dead run) is no obstacle
    p = holder(tmp_path, then)
    p.wait()
    assert (tmp_path / ".lock").read_text().strip() == f"PID {p.pid} on {socket.gethostname()}"
    assert take_and_release(tmp_path) == f"PID {os.getpid()} on {socket.gethostname()}"


def test_out_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        common.open_run_dir(str(tmp_path / "f"))
    with pytest.raises(ConfigError, match="cannot create out_dir"):
        common.open_run_dir(str(tmp_path / "f" / "run"))


# -----------------------------------------------------------------------------
# Saves: atomic, one line when they fail

def test_a_failed_save_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    common.save_atomic({"step": 1}, str(path))
    save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)  # a partial file is left, then the write fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(RunError, match="cannot write .*checkpoint.pth' .No space left") as e:
        common.save_atomic({"step": 2}, str(path))
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert common.load_checkpoint(str(path))["step"] == 1


def test_a_save_makes_its_folder_and_an_unwritable_one_is_one_line(tmp_path):
    # a teacher trained for minutes must not be lost because its folder did not exist yet
    path = tmp_path / "runs" / "teacher" / "teacher_cnn.pth"
    common.save_atomic({"step": 3}, str(path))
    assert common.load_checkpoint(str(path))["step"] == 3
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where a folder should be: makedirs fails
    with pytest.raises(RunError, match="cannot write .*a_file/sub/x.pth'") as e:
        common.save_atomic({"step": 4}, str(blocker / "sub" / "x.pth"))
    assert "\n" not in str(e.value)


def test_a_full_tmpfs_is_one_line(tmp_path):
    folder = tmp_path / "small"
    folder.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                       capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.decode().strip() or 'not root'})")
    try:
        with pytest.raises(RunError, match="cannot write .*if the disk is full"):
            common.save_atomic({"w": torch.zeros(100_000)}, str(folder / "checkpoint.pth"))
        assert os.listdir(folder) == []
    finally:
        subprocess.run(["umount", str(folder)], check=True)


# -----------------------------------------------------------------------------
# Outputs before "done", resume check

def tiny_run(tmp_path, module):
    """A common.Run over one Linear layer, positioned at step 2 of 2-step epochs."""
    run = common.Run(pretrain.Config(out_dir=str(tmp_path / "run"), batch_size=4), common.Dist())
    run.resume(2, load=lambda ckpt: None, state=lambda: {"model": module.state_dict()})
    run.step = 2
    return run


def test_a_save_writes_the_outputs_before_the_checkpoint(tmp_path, monkeypatch):
    order, save = [], common.save_atomic

    def save_and_note(obj, path):
        order.append(os.path.basename(path))
        save(obj, path)
    monkeypatch.setattr(common, "save_atomic", save_and_note)
    layer = torch.nn.Linear(3, 2)
    run = tiny_run(tmp_path, layer)
    run.save(1, {run.path("encoder.pth"): {"model": layer.state_dict()}}, keep=True)
    assert order == ["encoder.pth", "checkpoint.pth", "checkpoint-0001.pth"]
    for name in order:  # each tagged with the step it holds
        assert common.read_torch_file(run.path(name))["step"] == 2


def test_check_resume_config_lists_every_difference():
    saved = {"model": "vit_micro", "patch_size": 4, "blr": 1e-3}
    with pytest.raises(ConfigError) as e:
        common.check_resume_config(saved, {"model": "vit_tiny", "patch_size": 2, "blr": 5e-3},
                                   ("model", "patch_size"), "run/checkpoint.pth")
    assert str(e.value).startswith("run/checkpoint.pth was written with model='vit_micro' "
                                   "(now 'vit_tiny'), patch_size=4 (now 2)")
    common.check_resume_config(saved, dict(saved, blr=1.0), ("model", "patch_size"), "x")  # blr may


# -----------------------------------------------------------------------------
# Config errors: one line before any work, for every stage

@pytest.mark.parametrize("cls", [pretrain.Config, finetune.Config, probe.Config])
@pytest.mark.parametrize("args, message", [
    (["blr=-1e-3"], "config key 'blr' must be > 0, got -0.001"),
    (["blr=nan"], "config key 'blr' must be a finite number, got nan"),
    (["min_lr=.inf"], "config key 'min_lr' must be a finite number"),
    (["patch_size=0"], "config key 'patch_size' must be >= 1, got 0"),
    (["num_workers=-1"], "config key 'num_workers' must be >= 0, got -1"),
    (["epochs=0"], "config key 'epochs' must be >= 1, got 0"),
])
def test_values_no_run_can_use_are_config_errors(cls, args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        common.parse_config(cls, args)


@pytest.mark.parametrize("content", [b"model: [vit_tiny\nblr: 1\n", b"a: 1\n b: 2\n",
                                     b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"])
def test_a_config_file_that_is_not_yaml_is_one_line(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"config file '{path}' is not valid YAML"):
        common.parse_config(finetune.Config, ["--config", str(path)])


def test_every_checkpoint_field_is_a_plain_value(tmp_path):
    """What the stage scripts put in a checkpoint besides tensors: configs are plain values."""
    for cls in (pretrain.Config, finetune.Config, probe.Config):
        path = tmp_path / "c.pth"
        torch.save({"config": common.config_dict(cls()), "step": 0, "time": time.time()}, path)
        assert common.load_checkpoint(str(path))["config"] == common.config_dict(cls())


# -----------------------------------------------------------------------------
# precision: bf16 autocast only where the hardware computes it

def test_precision_auto_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(common, "native_bf16", lambda device, native=native: native)
        assert common.resolve_precision("auto", cpu) == expected
        assert common.autocast("auto", cpu).fast_dtype == torch.bfloat16
        assert common.autocast("auto", cpu)._enabled == (expected == "bf16")
        assert common.resolve_precision("fp32", cpu) == "fp32"  # as asked, whatever the CPU
        assert common.resolve_precision("bf16", cpu) == "bf16"
    allowed = r"'precision' must be one of \['auto', 'bf16', 'fp32'\], got 'fp16'"
    with pytest.raises(ConfigError, match=allowed):
        common.resolve_precision("fp16", cpu)
    for cls in (pretrain.Config, finetune.Config):
        with pytest.raises(ConfigError, match="precision"):
            common.make_config(cls, {"precision": "half"})


def _every_buffer(module):
    return {n: b.clone() for n, b in module.named_buffers()}


def test_ddp_buffers_are_constant_and_only_running_stats_are_broadcast(tmp_path):
    """common.ddp: broadcast_buffers=False is exact because no buffer of the pre-training and
    fine-tuning models changes in a training step; the probe heads' BatchNorm running statistics
    do change, so they keep the broadcast. The gradients equal the old wrap's (DDP defaults)."""
    import losses
    import model as M
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    enc = M.build_vit("vit_micro", img_size=16, patch_size=4, pos_embed="sincos")
    mae = M.MAE(enc, M.MAEDecoder(embed_dim=32, grid=4, patch_size=4, decoder_dim=32, depth=1,
                                  num_heads=2))
    simmim = M.SimMIM(M.build_vit("vit_micro", img_size=16, patch_size=4, rel_pos_bias=True))
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :6], mask[1, 5:11] = True, True
    for net in (mae, simmim):  # a few optimiser steps: every buffer stays as it was built
        before = _every_buffer(net)
        opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        for _ in range(2):
            pred, _ = net(x, mask)
            pred.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert before and all(torch.equal(b, before[n]) for n, b in net.named_buffers())

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    try:
        fake = common.Dist(world=2)  # ddp only wraps with several processes
        heads = losses.ProbeHeads(["cls", "mean"], dim=32, num_classes=3)
        for net, broadcast in ((mae, False), (simmim, False), (enc, False), (heads, True)):
            wrapped = common.ddp(net, fake)
            sync = getattr(wrapped, "forward_sync_buffers", None)  # torch >= 2.14 names it so
            assert (wrapped.broadcast_buffers if sync is None else sync) is broadcast
            assert wrapped.gradient_as_bucket_view
        torch.manual_seed(1)
        grads = []
        for wrap in (lambda m: DDP(m), lambda m: common.ddp(m, fake)):  # old wrap, new wrap
            torch.manual_seed(1)
            net = M.build_vit("vit_micro", img_size=16, patch_size=4, pos_embed="sincos",
                              num_classes=3)
            wrap(net)(x, mask=mask).logsumexp(-1).sum().backward()
            grads.append([p.grad.clone() for p in net.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    finally:
        torch.distributed.destroy_process_group()


def test_compile_wraps_ddp_so_each_bucket_all_reduces_during_the_backward(tmp_path,
                                                                            monkeypatch):
    # common.ddp(compile=True) compiles around DDP: dynamo splits the captured graph at DDP's
    # bucket boundaries (one graph per bucket), so a bucket's all-reduce can start while the
    # backward of the earlier layers still runs. Counted with a backend that records each graph
    # and runs it as captured, so the gradients must equal eager DDP's exactly.
    import model as M
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: real_compile(m, backend=recording))
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}",
                                         rank=0, world_size=1)
    try:
        fake = common.Dist(world=2)  # ddp only wraps with several processes
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        grads = {}
        for compiled in (False, True):
            torch.manual_seed(1)
            net = M.build_vit("vit_mini", img_size=16, patch_size=4, pos_embed="sincos",
                              num_classes=3)  # 4.8 MB of gradients: DDP's 1 MiB first bucket + 1
            common.ddp(net, fake, compile=compiled)(x).logsumexp(-1).sum().backward()
            grads[compiled] = [p.grad for p in net.parameters()]
        assert len(graphs) == 2  # one per bucket (without DDP's split: one graph)
        same = [a is b is None or torch.equal(a, b) for a, b in zip(grads[False], grads[True])]
        assert all(same) and sum(g is not None for g in grads[True]) > 10
    finally:
        torch.distributed.destroy_process_group()
        torch._dynamo.reset()
