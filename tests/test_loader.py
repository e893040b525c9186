"""The pre-training loader: crop first, uint8 out of the workers, normalised on the device, and
persistent workers that still draw each epoch's augmentation (the epoch travels in the keys)."""
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

import common
import data


def test_normalize_is_torchvisions_float_pipeline_bit_for_bit():
    """data.normalize on a uint8 batch == ToDtype(float32, scale=True) + Normalize per image,
    the worker-side pipeline it replaces: the model sees the same numbers."""
    x = torch.randint(0, 256, (3, 3, 7, 5), dtype=torch.uint8)
    reference = T.Compose([T.ToDtype(torch.float32, scale=True),
                           T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    expected = torch.stack([reference(img) for img in x])
    out = data.normalize(x)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_pretrain_transform_crops_before_the_jitter_and_ships_uint8():
    tf = data.pretrain_transform(16, crop_scale_min=0.2, color_jitter=0.4)
    kinds = [type(t) for t in tf.transforms]
    assert kinds.index(T.ColorJitter) > kinds.index(T.RandomResizedCrop)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), np.uint8))
    out = tf(img)
    assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 16, 16)
    # no crop: the whole image resized, then flip (no jitter asked: none applied)
    kinds = [type(t) for t in data.pretrain_transform(16, 1.0, 0.0).transforms]
    assert T.Resize in kinds and T.ColorJitter not in kinds and T.RandomResizedCrop not in kinds


class Draws(Dataset):
    """Each sample is a draw from torch's generator: what MaskedImages seeds per (epoch, index)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.rand(3), i


def masked_draws():
    return data.MaskedImages(Draws(), grid=2, mask_ratio=0.5, mask="random", seed=5)


def test_masked_images_read_the_epoch_from_the_key():
    ds = masked_draws()
    ds.set_epoch(3)
    by_attribute = ds[7]
    ds.set_epoch(0)
    by_key = ds[(3, 7)]
    for a, b in zip(by_attribute, by_key):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    assert not torch.equal(ds[(0, 7)][0], by_key[0])  # another epoch, another draw


def test_skip_sampler_yields_epoch_keys_after_the_skip():
    sampler = common.SkipSampler(torch.utils.data.DistributedSampler(
        masked_draws(), num_replicas=1, rank=0, shuffle=True, seed=0))
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, skip=5)
    assert list(sampler) == full[5:] and len(sampler) == len(full) - 5
    assert {e for e, _ in full} == {2}
    assert sorted(i for _, i in full) == list(range(12))


def epoch_batches(loader, epoch, skip=0):
    loader.sampler.set_epoch(epoch, skip=skip)  # never the dataset's set_epoch: the keys carry it
    return [(img, mask, label) for img, mask, label in loader]


def test_persistent_workers_draw_each_epochs_augmentation():
    """The same batches with 0 or 2 persistent loader processes, epoch after epoch and after a
    mid-epoch skip; without the epoch in the keys the workers would repeat epoch 0's draws."""
    ref = common.train_loader(masked_draws(), 3, common.Dist(), seed=0, num_workers=0)
    loader = common.train_loader(masked_draws(), 3, common.Dist(), seed=0, num_workers=2)
    assert loader.persistent_workers
    previous = None
    for epoch in (0, 1, 2):
        expected = epoch_batches(ref, epoch)
        got = epoch_batches(loader, epoch)
        assert len(got) == len(expected) == 4
        for a, b in zip(got, expected):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
        if previous is not None:
            assert not torch.equal(got[0][0], previous[0][0])
        previous = got
    resumed = epoch_batches(loader, 2, skip=6)  # two micro-batches of 3 already seen
    assert all(torch.equal(x, y) for a, b in zip(resumed, previous[2:]) for x, y in zip(a, b))


def test_on_device_yields_every_batch_in_order_with_the_tensors_moved():
    """common.on_device (pretrain.py's loop): every batch, in order, its tensors on the device and
    its other items untouched."""
    batches = [(torch.full((2, 3), float(i)), torch.tensor([i % 2 == 0]), i) for i in range(3)]
    out = list(common.on_device(iter(batches), torch.device("cpu")))
    assert len(out) == 3
    for (a, m, i), (b, n, j) in zip(out, batches):
        assert torch.equal(a, b) and torch.equal(m, n) and i == j
