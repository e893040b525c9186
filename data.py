"""Datasets, transforms and mask generators.

    ds = build_dataset("fashion_mnist", "data", train=True, transform=pretrain_transform(28))
    mask = block_mask(grid=14, num_masked=75)           # BEiT block-wise, exactly 75 True
    mask = random_mask(B, N, num_masked)                 # MAE: argsort of noise, (B, N) bool
    mask = simmim_mask(grid=8, cell=2, num_cells=10)     # SimMIM: random cells of 2x2 patches
    x = normalize(img.to(device))                        # uint8 (B, 3, H, W) -> model input

`MaskedImages` wraps a dataset for pre-training: every sample's augmentation and mask depend
only on (seed, epoch, index), so a run gives the same batches on 1 or many GPUs, with any
number of loader workers, and after a resume; the epoch can travel in the index, (epoch, i).
"""
import contextlib
import gzip
import math
import multiprocessing
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
    """DTM Table 12: random resized crop, flip, colour jitter -> uint8 (3, img_size, img_size).

    The crop comes first, so the jitter works on img_size^2 pixels, not on the whole decoded
    photograph (2.7 vs 9-11 ms per ImageNet JPEG on one core), as in timm and MAE. The loader
    ships uint8 (a quarter of float32's bytes through shared memory, pinning and the bus);
    `normalize` makes the model's input on the device. crop_scale_min >= 1 means no crop at
    all (the whole image, resized): small images such as Fashion-MNIST's 28 px lose their class
    to crops built for 224 px photographs."""
    ops = [T.ToImage()]
    if crop_scale_min < 1:
        ops.append(T.RandomResizedCrop(img_size, scale=(crop_scale_min, 1.0), antialias=True))
    else:
        ops.append(T.Resize((img_size, img_size), antialias=True))
    ops.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return T.Compose(ops)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 3, H, W), on the device -> float32 with ImageNet mean/std: the same
    operations, bit for bit, as torchvision's ToDtype(float32, scale=True) + Normalize."""
    mean, std = _mean_std(x.device)
    return x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


_MEAN_STD = {}  # device -> ImageNet mean, std (1, 3, 1, 1): made once, never copied per batch


def _mean_std(device: torch.device):
    if device not in _MEAN_STD:  # a host -> GPU copy waits for the GPU: only the first time
        _MEAN_STD[device] = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1)
                                  for v in (IMAGENET_MEAN, IMAGENET_STD))
    return _MEAN_STD[device]


def eval_transform(img_size: int, crop_ratio: float = 0.875):
    """Resize the short side to img_size / crop_ratio, centre crop (ImageNet: 256 -> 224)."""
    resize = img_size if img_size < 64 else int(math.ceil(img_size / crop_ratio))
    return T.Compose([T.ToImage(), T.Resize(resize, antialias=True), T.CenterCrop(img_size),
                      T.ToDtype(torch.float32, scale=True),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the ImageNet normalisation, for pictures: (B, 3, H, W) -> [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x * std + mean).clamp(0, 1)


# -----------------------------------------------------------------------------
# Datasets

class FashionMNIST(Dataset):
    """Fashion-MNIST from its idx files, grey replicated to 3 channels; (uint8 (3, 28, 28), label).

    Reads Debian's `dataset-fashion-mnist` files when present, else torchvision's download
    into `root`.
    """

    def __init__(self, root: str, train: bool = True, transform=None, download: bool = True):
        split = "train" if train else "t10k"
        folder = FASHION_MNIST_DEBIAN
        if not os.path.isfile(os.path.join(folder, f"{split}-images-idx3-ubyte.gz")):
            folder = os.path.join(root, "FashionMNIST", "raw")
            if not os.path.isfile(os.path.join(folder, f"{split}-images-idx3-ubyte.gz")):
                if not download:
                    raise FileNotFoundError(
                        f"Fashion-MNIST not found in {FASHION_MNIST_DEBIAN} or {folder}: "
                        "apt-get install dataset-fashion-mnist, or allow the download")
                datasets.FashionMNIST(root, train=train, download=True)
        images = _read_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"))
        labels = _read_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"))
        self.images = torch.from_numpy(images)
        self.targets = torch.from_numpy(labels).long()
        self.transform = transform
        self.classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i].unsqueeze(0).expand(3, -1, -1)  # (3, 28, 28) uint8
        img = tv_tensors.Image(img)
        if self.transform is not None:
            img = self.transform(img)
        return plain(img), int(self.targets[i])


def _read_idx(path: str) -> np.ndarray:
    """The idx format: big-endian magic (dtype, ndim), dims, then the raw bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


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
        if len(ds) == 0:
            raise FileNotFoundError(f"image folder '{folder}' holds no images")
    elif name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        ds = cls(root, train=train, transform=transform, download=True)
    else:
        raise ValueError(f"unknown dataset '{name}': choose one of {DATASETS}")
    if subset and subset < len(ds):  # evenly spaced: every class of a folder sorted by class
        ds = torch.utils.data.Subset(ds, [i * len(ds) // subset for i in range(subset)])
    return ds


class SafeImageFolder(datasets.ImageFolder):
    """ImageFolder that reports a corrupt or truncated image (its path, on stderr) and returns the
    next readable one instead, so one broken JPEG does not end a days-long run.

    `num_corrupt` counts the skips in this process and its loader workers (shared memory); the
    training loop reads it with `corrupt_count(ds)`, sums it over ranks and stops when it
    exceeds the allowed fraction of the data set (config key max_corrupt_frac).
    Images are read by `load_image` (16-bit and transparent images converted, said once); folder
    links that lead back into the tree are not followed; the image count per class is printed.
    """

    def __init__(self, root, transform=None):
        super().__init__(root, transform=transform, loader=load_image)
        self.num_corrupt = multiprocessing.Value("l", 0)
        if int(os.environ.get("RANK", 0)) == 0:
            print(class_counts(self.root, self.classes, self.targets), flush=True)

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None,
                     allow_empty=False):
        """(path, class index) for every image under directory/<class>/, as torchvision's, but
        without following folder links back into the tree (a loop would repeat images)."""
        valid = is_valid_file or (lambda p: p.lower().endswith(tuple(extensions)))
        tree, seen, samples = os.path.realpath(directory), set(), []
        for name in sorted(class_to_idx):
            folder = os.path.join(directory, name)
            found = [(p, class_to_idx[name]) for p in walk_files(folder, tree, seen) if valid(p)]
            if not found and not allow_empty:
                raise FileNotFoundError(f"class folder '{folder}' holds no images")
            samples += found
        return samples

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):  # ends a `for` over the data set, as a list does
            raise IndexError(i)
        for j in range(i, i + len(self)):
            try:
                return super().__getitem__(j % len(self))
            except (OSError, ValueError, SyntaxError) as e:
                # what PIL raises for a truncated, unidentified or bad-header file
                with self.num_corrupt.get_lock():
                    self.num_corrupt.value += 1
                print(f"warning: skipping corrupt image {self.samples[j % len(self)][0]} "
                      f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        raise OSError(f"no readable image in '{self.root}'")


def walk_files(folder: str, tree: str, seen: set):
    """Every file under `folder`, following folder links except those that lead back into (or
    above) `tree`, the data root, or to a folder already walked: each is skipped with a warning."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(root))
        keep = []
        for d in sorted(dirs):
            path = os.path.join(root, d)
            target = os.path.realpath(path)
            back = os.path.islink(path) and (_inside(target, tree) or _inside(tree, target))
            if back or target in seen:
                print(f"warning: not following the folder link {path} -> {target}: it leads back "
                      "into the data (a loop would repeat images)", file=sys.stderr, flush=True)
                continue
            keep.append(d)
        dirs[:] = keep
        yield from (os.path.join(root, f) for f in sorted(files))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def class_counts(root: str, classes: list, targets: list) -> str:
    """One line: the images per class (all of them up to 20 classes, else the fewest and most)."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(classes))
    head = f"{root}: {len(targets)} images in {len(classes)} classes"
    if len(classes) <= 20:
        return head + ": " + ", ".join(f"{c} {n}" for c, n in zip(classes, counts))
    lo, hi = int(counts.argmin()), int(counts.argmax())
    return head + f"; fewest: {classes[lo]} {counts[lo]}, most: {classes[hi]} {counts[hi]}"


_said = set()


def _say_once(kind: str, message: str):
    """A note on stderr the first time a conversion happens in this process."""
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
        return _from_16_bit(img, path)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        _say_once("alpha", f"{path} has transparency: composited onto white, as are all such "
                           "images")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _from_16_bit(img: Image.Image, path: str) -> Image.Image:
    pixels = np.asarray(img)
    if img.mode == "F" or pixels.min() < 0 or pixels.max() > 65535:
        raise ValueError(f"{path} has {img.mode} pixels outside 0..65535: save it with 8 or 16 "
                         "bits per channel")
    _say_once("16-bit", f"{path} is 16-bit: scaled to 8 bits (x 255/65535), as are all such images")
    grey = np.round(pixels.astype(np.float64) * (255 / 65535)).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def corrupt_count(ds) -> int:
    """Corrupt images skipped so far by the SafeImageFolder inside `ds` (0 for other data sets)."""
    while not isinstance(ds, SafeImageFolder):
        ds = getattr(ds, "dataset", None)  # Subset, MaskedImages
        if ds is None:
            return 0
    return ds.num_corrupt.value


def reset_corrupt_count(ds):
    while ds is not None and not isinstance(ds, SafeImageFolder):
        ds = getattr(ds, "dataset", None)
    if ds is not None:
        ds.num_corrupt.value = 0


# -----------------------------------------------------------------------------
# Masks

def block_mask(grid: int, num_masked: int, min_patches: int = 16, min_aspect: float = 0.3,
               max_aspect: Optional[float] = None,
               rng: Optional[random.Random] = None) -> torch.Tensor:
    """BEiT block-wise masking of a grid x grid patch map: (grid*grid,) bool, num_masked True.

    Rectangles of area U[min_patches, remaining] and aspect ratio log-uniform in
    [min_aspect, 1/min_aspect] are placed at random; a rectangle is kept only if it does not
    overshoot the count. When no rectangle of at least min_patches fits any more, smaller ones
    (down to 1x1) finish the count exactly, so the mask is always a union of rectangles.
    """
    rng = rng or random
    N = grid * grid
    if not 0 <= num_masked <= N:
        raise ValueError(f"num_masked must be in [0, {N}], got {num_masked}")
    max_aspect = max_aspect or 1.0 / min_aspect
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    count, lower, fails = 0, min(min_patches, num_masked), 0
    while count < num_masked:
        remaining = num_masked - count
        lower = min(lower, remaining)
        added = _place_block(mask, rng, rng.uniform(lower, remaining), log_aspect, remaining)
        count += added
        fails = 0 if added else fails + 1
        if fails >= 10:  # BEiT stops here; we shrink the blocks to finish the exact count
            lower, fails = max(1, lower // 2), 0
    return mask.flatten()


def _place_block(mask, rng, area, log_aspect, max_new) -> int:
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
    """SimMIM masking: num_cells random cells of cell x cell patches -> (grid*grid,) bool.

    SimMIM draws the mask on a coarser grid (32-px cells at 224 px with 16-px patches: cell = 2)
    and upsamples it to the patch grid, so exactly num_cells * cell^2 patches are True.
    """
    if grid % cell:
        raise ValueError(f"the patch grid {grid} is not a multiple of the mask cell {cell}")
    coarse = grid // cell
    if not 0 <= num_cells <= coarse * coarse:
        raise ValueError(f"num_cells must be in [0, {coarse * coarse}], got {num_cells}")
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

class MaskedImages(Dataset):
    """Wrap a dataset of (image, label) for pre-training -> (image, mask (N,) bool, label).

    Each sample's random crop, flip, jitter and mask are drawn from generators seeded by
    (seed, epoch, index): the batches do not depend on the number of processes or workers,
    and a resumed run sees exactly what an uninterrupted one would have seen.
    """

    def __init__(self, dataset, grid: int, mask_ratio: float, mask: str = "block",
                 min_patches: int = 16, seed: int = 0, mask_cell: int = 2):
        if mask not in MASKS:
            raise ValueError(f"mask must be one of {MASKS}, got '{mask}'")
        self.dataset, self.grid, self.mask, self.seed = dataset, grid, mask, seed
        self.num_masked = num_masked_patches(grid * grid, mask_ratio)
        if mask == "simmim":  # mask_cell: side of SimMIM's mask cell in patches
            self.num_cells = simmim_num_cells(grid, mask_cell, mask_ratio)
            self.num_masked = self.num_cells * mask_cell ** 2
        self.min_patches, self.mask_cell = min_patches, mask_cell
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = epoch_and_index(key, self.epoch)
        sample_seed = (self.seed * 1_000_003 + epoch) * 10_000_019 + i
        with seeded(sample_seed):
            img, label = self.dataset[i]
            if self.mask == "block":
                mask = block_mask(self.grid, self.num_masked, self.min_patches,
                                  rng=random.Random(sample_seed))
            elif self.mask == "simmim":
                mask = simmim_mask(self.grid, self.mask_cell, self.num_cells)
            else:
                mask = random_mask(1, self.grid * self.grid, self.num_masked)[0]
        return plain(img), mask, label


class SeededImages(Dataset):
    """Wrap a dataset so each sample's random augmentation depends only on (seed, epoch, index),
    as in MaskedImages: fine-tuning gives the same batches after a mid-epoch resume."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = epoch_and_index(key, self.epoch)
        with seeded((self.seed * 1_000_003 + epoch) * 10_000_019 + i):
            img, label = self.dataset[i]
        return plain(img), label


def epoch_and_index(key, epoch: int) -> tuple:
    """A sample key is an index (this dataset's set_epoch gives the epoch) or (epoch, index), as
    common.SkipSampler yields: persistent loader workers hold copies of the dataset made once,
    so the epoch reaches them inside the indices."""
    return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (epoch, int(key))


@contextlib.contextmanager
def seeded(seed: int):
    """Draw from torch's CPU generator seeded with `seed`, then put its state back: what
    torch.random.fork_rng(devices=[]) + torch.manual_seed do for the CPU, without manual_seed's
    seeding of every other backend (80 us per sample here, a quarter of the loader's time)."""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


def plain(x):
    """tv_tensors.Image -> torch.Tensor, so batches are ordinary tensors."""
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x
