"""experiments/spatial_inconsistency.py: morphing at N_m = N is the identity, a hand-made morphing,
the ensemble (mean per-patch softmax), the dose `perturb`, the CLIP zero-shot head on a tiny
random open_clip model, and the CLI end to end on a tiny CNN and image folder."""
import json
import os
import re
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import data  # noqa: E402
import model as M  # noqa: E402
import spatial_inconsistency as S  # noqa: E402


def test_morphing_to_n_tokens_changes_nothing():
    torch.manual_seed(0)
    tokens = torch.randn(3, 16, 8)
    head = torch.nn.Linear(8, 5)
    assert torch.equal(S.morph_tokens(tokens, 16, 1), tokens)
    for got, want in zip(S.predictions(head(S.morph_tokens(tokens, 16, 3))),
                         S.predictions(head(tokens))):
        assert torch.equal(got, want)
    assert not torch.equal(S.morph_tokens(tokens, 8, 1), tokens)   # N_m < N does change them


def test_hand_made_morphing():
    """v = [(1,0), (1,0), (0,1), (0,-1)], N_m = 2, k = 1: A = {0, 2}, B = {1, 3}; 0 -> 1 (cosine
    1), 2 -> 1 (cosine 0 > -1); both merge: clusters {0, 1, 2} and {3}."""
    v = torch.tensor([[[1., 0.], [1., 0.], [0., 1.], [0., -1.]]])
    mean = torch.tensor([2 / 3, 1 / 3])
    want = torch.stack([mean, mean, mean, torch.tensor([0., -1.])]).unsqueeze(0)
    assert torch.allclose(S.morph_tokens(v, 2, 1), want)
    patch, _ = S.predictions(v)                                   # logits = the tokens themselves
    assert patch.tolist() == [[0, 0, 1, 0]]                       # argmax of (0, -1) is class 0
    patch, ens = S.predictions(S.morph_tokens(v, 2, 1))
    assert patch.tolist() == [[0, 0, 0, 0]] and ens.tolist() == [0]
    # through evaluate: a "teacher" that passes the tokens through, image label 1
    counts, shown = S.evaluate(lambda x: x, {"id": lambda t: t}, [(v, torch.tensor([1]))],
                               [(0.0, 0.0)], [4, 2], 1, 0, "cpu", keep=1)
    assert counts[("id", 0.0, 0.0, 4)] == [1, 0, 1]               # 1 correct patch, ensemble 0
    assert counts[("id", 0.0, 0.0, 2)] == [0, 0, 1]
    assert shown[("id", 0.0, 0.0, 2)].tolist() == [[0, 0, 0, 0]]
    rows = {r["num_morphed"]: r for r in S.rows_of(counts, 4)}
    assert rows[4]["patch_top1"] == 25.0 and rows[2]["patch_top1"] == 0.0


def test_ensemble_is_the_mean_per_patch_softmax():
    # image 0: majority vote says 1, mean softmax 0; image 1: mean logits say 1, mean softmax 0
    logits = torch.tensor([[[10., 0.], [0., .1], [0., .1]], [[0., 3.], [1., 0.], [1., 0.]]])
    patch, ens = S.predictions(logits)
    assert patch.tolist() == [[0, 1, 1], [1, 0, 0]] and ens.tolist() == [0, 0]
    assert logits.mean(1).argmax(-1).tolist() == [0, 1]           # what ens must not be
    torch.manual_seed(1)
    logits = torch.randn(4, 9, 7) * 3
    want = torch.stack([sum(row.softmax(-1) for row in img) / 9 for img in logits]).argmax(-1)
    assert torch.equal(S.predictions(logits)[1], want)


def tagged(B=4, N=6):
    """tokens[b, n] = (b, n, 1): each token says which image and position it came from."""
    b, n = torch.meshgrid(torch.arange(B), torch.arange(N), indexing="ij")
    return torch.stack([b, n, torch.ones_like(b)], -1).float()


def test_perturb_identity_swap_and_determinism():
    t = tagged()
    assert S.perturb(t, 0, 0, torch.Generator().manual_seed(0)) is t
    out = S.perturb(t, 0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out[..., 1], t[..., 1])                    # the same position
    src = out[..., 0]
    assert (src != t[..., 0]).all()                               # always another image ...
    assert len(set(src[0].tolist())) > 1                          # ... drawn per position
    for noise, swap in ((0, 0.5), (1.0, 0), (2.0, 0.25)):
        a = S.perturb(t, noise, swap, torch.Generator().manual_seed(3))
        b = S.perturb(t, noise, swap, torch.Generator().manual_seed(3))
        c = S.perturb(t, noise, swap, torch.Generator().manual_seed(4))
        assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="at least 2"):
        S.perturb(t[:1], 0, 0.5, torch.Generator())


def test_perturb_doses():
    t = tagged(64, 64)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    half = S.perturb(t, 0, 0.5, g())
    moved = half[..., 0] != t[..., 0]
    assert 0.45 < moved.float().mean() < 0.55
    quarter = S.perturb(t, 0, 0.25, g())                          # nested: a subset of `moved`
    assert not ((quarter[..., 0] != t[..., 0]) & ~moved).any()
    noisy = S.perturb(t, 2.0, 0, g())
    assert abs((noisy - t).std() / t.std() - 2.0) < 0.05


def tiny_clip(tmp_path):
    """A random open_clip model of a tiny config, saved as a weights file -> (name, file)."""
    import open_clip
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                          "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                        "layers": 1}}
    (tmp_path / "tiny-test-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "tiny-test-clip.json"))
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-test-clip", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "tiny.pt")
    return "tiny-test-clip", str(tmp_path / "tiny.pt")


def test_clip_zeroshot_on_a_tiny_random_model(tmp_path):
    import open_clip
    name, weights = tiny_clip(tmp_path)
    clip = open_clip.create_model(name, pretrained=weights).eval()
    classifier = S.zeroshot_classifier(clip, open_clip.get_tokenizer(name), ["cat", "dog", "car"],
                                       open_clip.OPENAI_IMAGENET_TEMPLATES[:3], "cpu")
    assert classifier.shape == (3, 16)
    assert torch.allclose(classifier.norm(dim=1), torch.ones(3), atol=1e-5)
    teacher = M.CLIPTeacher(name, weights)
    x = torch.randn(2, 3, 32, 32)                                 # normalised as the student's
    x_clip = x * teacher.scale + teacher.shift                    # CLIP's own normalisation
    visual = clip.visual
    visual.output_tokens = True
    with torch.no_grad():
        pooled, patches = visual(x_clip)                          # open_clip's forward
        visual.output_tokens = False
        image = clip.encode_image(x_clip)
        tokens = teacher(x)                                       # (2, 16, 16)
    # the teacher's patch tokens get the pooled token's ln_post + proj: the joint space
    assert tokens.shape == (2, 16, 16)
    assert torch.allclose(tokens, patches @ visual.proj, atol=1e-5)
    assert torch.allclose(pooled, image, atol=1e-6)
    # the head on the pooled embedding is CLIP's zero-shot classification
    head = S.zeroshot_head(classifier, 100.0)
    want = 100 * torch.nn.functional.normalize(image, dim=-1) @ classifier.T
    assert torch.allclose(head(image.unsqueeze(1))[:, 0], want, atol=1e-4)
    zs = S.clip_zeroshot(Namespace(model=name, weights=weights), ["a", "b"], "cpu")
    assert zs(tokens).shape == (2, 16, 2)


def run_cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "experiments/spatial_inconsistency.py", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_on_a_tiny_cnn(tmp_path, tiny_imagefolder):
    torch.manual_seed(0)
    cnn = M.SmallCNN(2, width=16)
    path = tmp_path / "cnn.pth"
    torch.save({"num_classes": 2, "width": 16, "model": cnn.state_dict()}, path)
    out, fig = tmp_path / "out.json", tmp_path / "fig.png"
    p = run_cli("--teacher", "cnn", "--weights", str(path), "--dataset", "imagefolder",
                "--data-path", tiny_imagefolder, "--img-size", "16", "--batch-size", "4",
                "--probe-epochs", "1", "--noise", "0,1", "--swap", "0,0.5", "--json", str(out),
                "--figure", str(fig))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "per-patch w/o" in p.stdout and "ensemble top-1 (%) by N_m" in p.stdout
    rows = json.loads(out.read_text())["rows"]
    levels = [16, 12, 8, 4, 2, 1]
    assert len(rows) == 2 * 4 * len(levels)                       # heads x doses x N_m
    assert {r["num_morphed"] for r in rows} == set(levels) and os.path.getsize(fig) > 0
    assert all(0 <= r["patch_top1"] <= 100 and 0 <= r["ensemble_top1"] <= 100 for r in rows)
    # fc at N_m = 1: every patch is the mean token, so each gives SmallCNN.classify's answer
    val = data.build_dataset("imagefolder", tiny_imagefolder, False, data.eval_transform(16))
    x = torch.stack([val[i][0] for i in range(len(val))])   # (SafeImageFolder never ends a for)
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        top1 = 100 * (cnn.eval().classify(x).argmax(1) == y).float().mean().item()
    fc = {r["num_morphed"]: r for r in rows if r["head"] == "fc" and r["noise"] == r["swap"] == 0}
    assert fc[1]["patch_top1"] == pytest.approx(top1)
    assert fc[1]["ensemble_top1"] == pytest.approx(top1)
    printed = re.findall(r"^(fc|probe) +([\d.]+) +([\d.]+) \|", p.stdout, re.M)
    doses = [(n, s) for n in ("0", "1") for s in ("0", "0.5")]
    assert printed == 3 * [(h, *d) for h in ("fc", "probe") for d in doses]   # 3 tables


def test_cli_missing_weights_is_one_line(tmp_path):
    p = run_cli("--teacher", "cnn", "--weights", str(tmp_path / "none.pth"))
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "--weights" in p.stderr and "teacher_cnn.pth" in p.stderr


def test_checkpoint_teacher_in_process(tmp_path, tiny_imagefolder, capsys):
    """An encoder of this project as teacher (patch tokens = tokens[:, 1:]), the probe head only."""
    torch.manual_seed(0)
    vit = M.build_vit("vit_micro", img_size=16, patch_size=4)
    torch.save(M.encoder_state(vit), tmp_path / "encoder.pth")
    S.main(["--teacher", "checkpoint", "--weights", str(tmp_path / "encoder.pth"),
            "--dataset", "imagefolder", "--data-path", tiny_imagefolder, "--probe-epochs", "1",
            "--subset", "6", "--batch-size", "4", "--json", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["num_tokens"] == 16 and out["images"] == 6
    assert {r["head"] for r in out["rows"]} == {"probe"} and len(out["rows"]) == 6
    assert "16 tokens; heads: probe" in capsys.readouterr().out
    with pytest.raises(S.ConfigError, match="drop --img-size"):
        S.main(["--teacher", "checkpoint", "--weights", str(tmp_path / "encoder.pth"),
                "--img-size", "32"])
