import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread in the test process, as the scripts the tests start get (OMP_NUM_THREADS=1).
# The tensors here are tiny: a second thread buys nothing, and on a 2-core machine that also runs
# those scripts its spin-waits made some in-process tests 5-10x slower.
torch.set_num_threads(1)


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
