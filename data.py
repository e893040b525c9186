"""Datasets, transforms and mask generators.

    ds = build_dataset("fashion_mnist", "data", train=True, transform=pretrain_transform(28))
    mask = block_mask(grid=14, num_masked=75)           # BEiT block-wise, exactly 75 True
    mask = random_mask(B, N, num_masked)                 # MAE: argsort of noise, (B, N) bool
    mask = simmim_mask(grid=8, cell=2, num_cells=10)     # SimMIM: random cells of 2x2 patches
    x = normalize(img.to(device))                        # uint8 (B, 3, H, W) -> model input

`MaskedImages` wraps a dataset for pre-training: every sample's augmentation and mask depend
only on (seed, epoch, index), so a run gives the same batches on 1 or many GPUs, with any
number of loader workers, and after a resume.
"""
import contextlib
import functools
import gzip
import math
import os
import random
import sys
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATASETS = ("fashion_mnist", "imagefolder", "cifar10", "cifar100")
MASKS = ("block", "random", "simmim")  # BEiT block-wise | MAE random | SimMIM random coarse cells
FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


# -----------------------------------------------------------------------------
# Transforms

def pretrain_transform(img_size: int, crop_scale_min: float = 0.08, color_jitter: float = 0.4):
    """DTM Table 12: random resized crop (first, as in timm and MAE), flip, colour jitter -> uint8
    (3, img_size, img_size); `normalize` makes the model's input on the device. crop_scale_min
    >= 1 means no crop (the whole image, resized): 28 px clothes lose their class to crops."""
    crop = (T.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True)
            if crop_scale_min < 1 else T.Resize((img_size, img_size), antialias=True))
    jitter = [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter > 0 else []
    return T.Compose([T.ToImage(), crop, T.RandomHorizontalFlip(), *jitter])


@functools.lru_cache
def mean_std(device: torch.device):
    """ImageNet mean and std, (1, 3, 1, 1) each, made once per device."""
    return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1)
                 for v in (IMAGENET_MEAN, IMAGENET_STD))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W), on the device -> float32 with ImageNet mean/std, as
    torchvision's ToDtype(float32, scale=True) + Normalize."""
    mean, std = mean_std(x.device)
    return x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


def eval_transform(img_size: int, crop_ratio: float = 0.875):
    """Resize the short side to img_size / crop_ratio, centre crop (ImageNet: 256 -> 224)."""
    resize = img_size if img_size < 64 else int(math.ceil(img_size / crop_ratio))
    return T.Compose([T.ToImage(), T.Resize(resize, antialias=True), T.CenterCrop(img_size),
                      T.ToDtype(torch.float32, scale=True),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the ImageNet normalisation, for pictures: (B, 3, H, W) -> [0, 1]."""
    mean, std = mean_std(x.device)
    return (x * std + mean).clamp(0, 1)


# -----------------------------------------------------------------------------
# Datasets

class FashionMNIST(Dataset):
    """Fashion-MNIST, grey replicated to 3 channels -> (uint8 (3, 28, 28), label): the idx files
    of Debian's `dataset-fashion-mnist` when installed, else torchvision's download into `root`."""

    classes = datasets.FashionMNIST.classes

    def __init__(self, root: str, train: bool = True, transform=None):
        files = [os.path.join(FASHION_MNIST_DEBIAN, f"{'train' if train else 't10k'}-{kind}.gz")
                 for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        if os.path.isfile(files[0]):
            images, labels = (torch.from_numpy(read_idx(f)) for f in files)
        else:
            download = datasets.FashionMNIST(root, train=train, download=True)
            images, labels = download.data, download.targets
        self.images, self.targets, self.transform = images, labels.long(), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = tv_tensors.Image(self.images[i].unsqueeze(0).expand(3, -1, -1))  # (3, 28, 28) uint8
        if self.transform is not None:
            img = self.transform(img)
        return plain(img), int(self.targets[i])


def read_idx(path: str) -> np.ndarray:
    """A gzipped idx file of bytes: 4 magic bytes (the last: ndim), ndim big-endian int32 sizes,
    then the bytes."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = np.frombuffer(raw, dtype=">i4", count=raw[3], offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * raw[3]).reshape(dims).copy()


def build_dataset(name: str, root: str, train: bool, transform=None, subset: int = 0):
    """One of DATASETS. `imagefolder` reads root/train and root/val (ImageNet layout). subset > 0:
    that many images, evenly spaced over the split (an image folder is sorted by class)."""
    if name == "fashion_mnist":
        ds = FashionMNIST(root, train=train, transform=transform)
    elif name == "imagefolder":
        folder = os.path.join(root, "train" if train else "val")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"image folder '{folder}' does not exist: data_path must "
                                    "hold train/ and val/ with one sub-folder per class "
                                    "(ImageNet layout)")
        ds = SafeImageFolder(folder, transform=transform)
    else:  # every config checks the name against DATASETS
        cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
        ds = cls(root, train=train, transform=transform, download=True)
    if subset and subset < len(ds):
        ds = torch.utils.data.Subset(ds, [i * len(ds) // subset for i in range(subset)])
    return ds


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that reports a corrupt image (its path, on stderr) and returns the next
    readable one, so one broken JPEG does not end a days-long run. Images are read by
    `load_image`; the image count per class is printed."""

    def __init__(self, root, transform=None):
        super().__init__(root, transform=transform, loader=load_image)
        if int(os.environ.get("RANK", 0)) == 0:
            print(class_counts(self.root, self.classes, self.targets), flush=True)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):  # ends a `for` over the data set, as a list does
            raise IndexError(i)
        for j in range(i, i + len(self)):
            try:
                return super().__getitem__(j % len(self))
            except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated, unknown, bad header
                print(f"warning: skipping corrupt image {self.samples[j % len(self)][0]} "
                      f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        raise OSError(f"no readable image in '{self.root}'")


def class_counts(root: str, classes: list, targets: list) -> str:
    """One line: the images per class (all of them up to 20 classes, else the fewest and most)."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(classes))
    head = f"{root}: {len(targets)} images in {len(classes)} classes"
    if len(classes) <= 20:
        return head + ": " + ", ".join(f"{c} {n}" for c, n in zip(classes, counts))
    lo, hi = int(counts.argmin()), int(counts.argmax())
    return head + f"; fewest: {classes[lo]} {counts[lo]}, most: {classes[hi]} {counts[hi]}"


_said = set()


def say_once(kind: str, message: str):
    """A note on stderr the first time a conversion of this kind happens in this process."""
    if kind not in _said:
        _said.add(kind)
        print(f"note: {message} (said once)", file=sys.stderr, flush=True)


def load_image(path: str) -> Image.Image:
    """An image file -> 8-bit RGB. PIL's convert('RGB') alone clips 16-bit grey to white and
    keeps the colour under alpha 0 (often black): here 16-bit values are scaled by 255/65535
    and transparent images are composited onto white. Float or 32-bit pixels are refused."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode in ("F", "I") or img.mode.startswith("I;16"):
        pixels = np.asarray(img)
        if img.mode == "F" or pixels.min() < 0 or pixels.max() > 65535:
            raise ValueError(f"{path} has {img.mode} pixels outside 0..65535: save it with 8 or "
                             "16 bits per channel")
        say_once("16-bit", f"{path} is 16-bit: scaled to 8 bits (x 255/65535), as are all "
                           "such images")
        grey = np.round(pixels.astype(np.float64) * (255 / 65535)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        say_once("alpha", f"{path} has transparency: composited onto white, as are all such "
                          "images")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")


# -----------------------------------------------------------------------------
# Masks

def block_mask(grid: int, num_masked: int, min_patches: int = 16, min_aspect: float = 0.3,
               rng: Optional[random.Random] = None) -> torch.Tensor:
    """BEiT block-wise masking of a grid x grid patch map: (grid*grid,) bool, num_masked True.
    Rectangles of area U[min_patches, remaining], aspect ratio log-uniform in [min_aspect,
    1/min_aspect], are placed at random unless they overshoot the count; when none fits any
    more, smaller ones (down to 1x1) finish the count exactly."""
    rng = rng or random
    if not 0 <= num_masked <= grid * grid:
        raise ValueError(f"num_masked must be in [0, {grid * grid}], got {num_masked}")
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    count, lower, fails = 0, min(min_patches, num_masked), 0
    while count < num_masked:
        remaining = num_masked - count
        lower = min(lower, remaining)
        added = place_block(mask, rng, rng.uniform(lower, remaining), log_aspect, remaining)
        count += added
        fails = 0 if added else fails + 1
        if fails >= 10:  # BEiT stops here; we shrink the blocks to finish the exact count
            lower, fails = max(1, lower // 2), 0
    return mask.flatten()


def place_block(mask, rng, area, log_aspect, max_new) -> int:
    """Try 10 times to mark a rectangle of `area` adding 1..max_new patches -> patches added."""
    grid = mask.shape[0]
    for _ in range(10):
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if 1 <= h <= grid and 1 <= w <= grid:
            top, left = rng.randint(0, grid - h), rng.randint(0, grid - w)
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= max_new:
                mask[top:top + h, left:left + w] = True
                return new
    return 0


def random_mask(batch: int, num_patches: int, num_masked: int, device=None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """MAE random masking: argsort of uniform noise; (B, N) bool with exactly num_masked True."""
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise
    return ranks < num_masked


def simmim_mask(grid: int, cell: int, num_cells: int,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SimMIM masking: num_cells random cells of cell x cell patches -> (grid*grid,) bool, drawn
    on a coarser grid (32-px cells at 224 px with 16-px patches: cell = 2) and upsampled to the
    patch grid (a multiple of cell): num_cells * cell^2 patches are True."""
    coarse = grid // cell
    mask = torch.zeros(coarse * coarse, dtype=torch.bool)
    mask[torch.randperm(coarse * coarse, generator=generator)[:num_cells]] = True
    mask = mask.view(coarse, coarse).repeat_interleave(cell, 0).repeat_interleave(cell, 1)
    return mask.flatten()                                       # (grid*grid,)


def simmim_num_cells(grid: int, cell: int, ratio: float) -> int:
    """SimMIM's count: ceil(r * cells) (its MaskGenerator uses np.ceil, e.g. 30 of 49 at 224 px)."""
    return int(math.ceil(ratio * (grid // cell) ** 2 - 1e-9))


def num_masked_patches(num_patches: int, ratio: float) -> int:
    """|M| = floor(r * N)."""
    return int(math.floor(ratio * num_patches + 1e-9))


# -----------------------------------------------------------------------------
# Pre-training samples: (image, mask) with per-sample deterministic randomness

class SeededImages(Dataset):
    """Wrap a dataset so each sample's augmentation is drawn from torch's generator seeded by
    (seed, epoch, index): the batches do not depend on the number of processes or workers, and a
    resumed run sees what an uninterrupted one would have seen. A key is an index (the epoch is
    set_epoch's) or (epoch, index) as common.SkipSampler yields: persistent loader workers hold
    copies of the data set made once, so the epoch reaches them inside the keys."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = map(int, key) if isinstance(key, (tuple, list)) else (self.epoch, int(key))
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + i
        with seeded(sample_seed):
            return self.draw(i, sample_seed)

    def draw(self, i: int, sample_seed: int):
        img, label = self.dataset[i]
        return plain(img), label


class MaskedImages(SeededImages):
    """SeededImages for pre-training -> (image, mask (N,) bool, label): the mask (mask: one of
    MASKS) is drawn after the augmentation, from the same seed."""

    def __init__(self, dataset, grid: int, mask_ratio: float, mask: str = "block",
                 min_patches: int = 16, seed: int = 0, mask_cell: int = 2):
        super().__init__(dataset, seed)
        self.grid, self.mask, self.min_patches, self.mask_cell = grid, mask, min_patches, mask_cell
        self.num_masked = num_masked_patches(grid * grid, mask_ratio)
        if mask == "simmim":  # mask_cell: side of SimMIM's mask cell in patches
            self.num_cells = simmim_num_cells(grid, mask_cell, mask_ratio)
            self.num_masked = self.num_cells * mask_cell ** 2

    def draw(self, i: int, sample_seed: int):
        img, label = super().draw(i, sample_seed)
        if self.mask == "block":
            mask = block_mask(self.grid, self.num_masked, self.min_patches,
                              rng=random.Random(sample_seed))
        elif self.mask == "simmim":
            mask = simmim_mask(self.grid, self.mask_cell, self.num_cells)
        else:
            mask = random_mask(1, self.grid * self.grid, self.num_masked)[0]
        return img, mask, label


@contextlib.contextmanager
def seeded(seed: int):
    """Draw from torch's CPU generator seeded with `seed`, then put its state back: what
    torch.random.fork_rng(devices=[]) + torch.manual_seed do for the CPU alone."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


def plain(x):
    """tv_tensors.Image -> torch.Tensor, so batches are ordinary tensors."""
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x
