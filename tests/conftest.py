import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory):
    """An ImageNet-layout folder of 40 small random RGB PNGs in 2 classes (train/ and val/)."""
    import numpy as np
    from PIL import Image
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("val", 8)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count // 2):
                pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
                pixels[..., c] //= 4  # a little class signal
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(root)
