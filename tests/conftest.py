import warnings

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)  # shared 2-core machines: more threads are slower and erratic
warnings.filterwarnings("ignore", message=".*torchvision.*")


def reference_image(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def tiny_sdxl():
    from anyms_core.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture(scope="session")
def tiny_sd15():
    from anyms_core.testing import tiny_sd15_pipeline

    return tiny_sd15_pipeline()
