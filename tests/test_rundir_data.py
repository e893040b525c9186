"""The image folder loader: 16-bit and transparent images converted (and said), refused with the
path when they cannot be; corrupt images skipped with their path; images per class printed."""
import os

import numpy as np
import pytest
from PIL import Image

import data


def save(path, pixels, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return str(path)


def test_16_bit_grey_is_scaled_not_clipped_to_white(tmp_path, capsys):
    path = save(tmp_path / "g16.png", np.full((6, 6), 20000, np.uint16))
    assert Image.open(path).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # PIL alone: white
    img = data.load_image(path)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (78, 78, 78)        # 20000 * 255 / 65535
    assert "is 16-bit: scaled to 8 bits" in capsys.readouterr().err


def test_transparent_pixels_become_white_not_black(tmp_path, capsys):
    pixels = np.zeros((6, 6, 4), np.uint8)           # alpha 0: colour underneath is black
    pixels[:3, :, :] = (200, 10, 10, 255)            # top half: opaque red
    path = save(tmp_path / "rgba.png", pixels, "RGBA")
    img = data.load_image(path)
    assert img.getpixel((0, 0)) == (200, 10, 10) and img.getpixel((0, 5)) == (255, 255, 255)
    assert "has transparency: composited onto white" in capsys.readouterr().err


def test_float_pixels_are_refused_with_the_path(tmp_path):
    path = str(tmp_path / "f.tiff")
    Image.fromarray(np.full((6, 6), 1e6, np.float32), "F").save(path)
    with pytest.raises(ValueError, match=f"{path} has F pixels"):
        data.load_image(path)


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, count in (("cat", 3), ("dog", 2)):
        for i in range(count):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            save(tmp_path / "train" / c / f"{i}.png", pixels)
    return tmp_path / "train"


def test_image_count_per_class_is_printed(folder, capsys):
    ds = data.SafeImageFolder(str(folder))
    assert len(ds) == 5
    assert f"{folder}: 5 images in 2 classes: cat 3, dog 2" in capsys.readouterr().out


def test_an_unreadable_image_is_skipped_with_its_path(folder, capsys):
    path = save(folder / "dog" / "f.tiff", np.full((8, 8), 1e6, np.float32), "F")
    ds = data.SafeImageFolder(str(folder), transform=None)
    i = [p for p, _ in ds.samples].index(path)
    ds[i]
    assert f"skipping corrupt image {path}" in capsys.readouterr().err


def test_subsets_cover_every_class_of_a_folder_sorted_by_class(tiny_imagefolder):
    # an image folder lists its images class by class (ImageNet: 1,300 of class 0 first), so
    # the first n images of a k-NN bank or a validation subset would all be of class 0
    full = data.build_dataset("imagefolder", tiny_imagefolder, train=True)
    assert full.targets == sorted(full.targets) and len(set(full.targets)) == 2
    for n in (2, 4, 7, 31):
        part = data.build_dataset("imagefolder", tiny_imagefolder, train=True, subset=n)
        labels = [full.targets[i] for i in part.indices]
        assert len(part) == n == len(set(part.indices)) and set(labels) == {0, 1}, n
        assert abs(labels.count(0) - labels.count(1)) <= 1, (n, labels)
