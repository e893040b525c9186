"""Bad input to the stage scripts: one line 'error: ...' and exit code 2, never a traceback; a bad
config value stops the run before out_dir is even created."""
import functools
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_injection as F  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files to give as --config, init, backbone or teacher_pretrained, and a spare encoder."""
    import model as M
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "broken.yaml").write_text("model: [vit_tiny\nblr: 1\n")
    (tmp / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp / "random.pth").write_bytes(bytes((i * 7919) % 256 for i in range(4000)))
    torch.save({"model": {"w": torch.zeros(4000)}}, tmp / "full.pth")
    (tmp / "truncated.pth").write_bytes((tmp / "full.pth").read_bytes()[:5000])
    torch.save({"model": {}, "optimizer": {}, "step": 4, "config": {}}, tmp / "checkpoint.pth")
    torch.manual_seed(0)
    encoder = M.build_vit("vit_micro", img_size=16, patch_size=4)
    torch.save(M.encoder_state(encoder), tmp / "encoder.pth")
    (tmp / "a_file").write_text("")
    return tmp


CASES = [  # (script, args, words of the one line); {f} is the folder of bad files
    ("finetune.py", ["--config", "{f}/broken.yaml"], "is not valid YAML at line 2"),
    ("probe.py", ["--config", "{f}/binary.yaml"], "is not valid YAML"),
    ("pretrain.py", ["--config", "{f}/broken.yaml"], "is not valid YAML"),
    ("finetune.py", ["blr=-0.1"], "config key 'blr' must be > 0"),
    ("pretrain.py", ["blr=nan"], "config key 'blr' must be a finite number, got nan"),
    ("probe.py", ["blr=.nan"], "config key 'blr' must be a finite number"),
    ("pretrain.py", ["patch_size=0"], "config key 'patch_size' must be >= 1, got 0"),
    ("finetune.py", ["patch_size=0"], "config key 'patch_size' must be >= 1, got 0"),
    ("probe.py", ["num_workers=-1"], "config key 'num_workers' must be >= 0, got -1"),
    ("finetune.py", ["out_dir={f}/a_file"], "is a file, not a folder"),
    ("probe.py", ["out_dir={f}/a_file/run"], "cannot create out_dir"),
    ("finetune.py", ["init={f}/random.pth"], "config key 'init': cannot read"),
    ("finetune.py", ["init={f}/truncated.pth"], "config key 'init': cannot read"),
    ("finetune.py", ["init={f}/checkpoint.pth"], "is a training checkpoint, not weights"),
    ("probe.py", ["backbone={f}/random.pth"], "config key 'backbone': cannot read"),
    ("probe.py", ["backbone={f}/truncated.pth"], "truncated or not a torch file"),
    ("probe.py", ["backbone={f}/checkpoint.pth"], "is a training checkpoint, not weights"),
    ("probe.py", ["backbone={f}/random.pth", "backbone_format=timm"], "'backbone': cannot read"),
    ("pretrain.py", ["teacher=checkpoint", "teacher_pretrained={f}/random.pth"],
     "config key 'teacher_pretrained': cannot read"),
    ("pretrain.py", ["teacher=checkpoint", "teacher_pretrained={f}/truncated.pth"],
     "config key 'teacher_pretrained': cannot read"),
]


@pytest.fixture(scope="module")
def case_runs(tiny_imagefolder, files, tmp_path_factory):
    """Every case of CASES run once, side by side (independent processes, F.in_parallel), each
    into its own empty folder -> {(script, args as written): (out_dir, args, process)}."""
    root = tmp_path_factory.mktemp("cases")

    def case(i, script, args):
        (root / str(i)).mkdir()
        out = str(root / str(i) / "run")
        args = [a.format(f=files) for a in args]
        encoder = str(files / "encoder.pth")
        return out, args, F.run(script, F.tiny_args(script, tiny_imagefolder, out, encoder) + args)
    calls = [functools.partial(case, i, s, a) for i, (s, a, _) in enumerate(CASES)]
    return {(s, tuple(a)): result for (s, a, _), result in zip(CASES, F.in_parallel(calls))}


@pytest.mark.parametrize("script, args, message", CASES,
                         ids=[f"{s}-{' '.join(a)}" for s, a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(case_runs, script, args, message):
    out, args, p = case_runs[(script, tuple(args))]
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    files_named = ("init=", "backbone=", "teacher_pretrained=", "out_dir=")
    if not any(a.startswith(files_named) for a in args):
        assert not os.path.exists(out)  # a config error: caught before any work


@pytest.fixture()
def read_only_dir(tmp_path):
    """A folder this process cannot write: a read-only tmpfs as root, else chmod 555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                       capture_output=True)
    if p.returncode != 0:
        reason = p.stderr.decode().strip()
        pytest.skip(f"as root, only a read-only mount denies writes; it failed: {reason}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("sub", ["", "run"])
def test_an_out_dir_that_is_not_writable_is_one_line(tiny_imagefolder, read_only_dir, sub):
    out = str(read_only_dir / sub) if sub else str(read_only_dir)
    p = F.run("finetune.py", F.tiny_args("finetune.py", tiny_imagefolder, out))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "out_dir" in lines[0], p.stderr[-3000:]
    assert any(s in lines[0] for s in ("not writable", "cannot create out_dir", "cannot write"))
