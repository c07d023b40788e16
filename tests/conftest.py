import warnings

import pytest
import torch

torch.set_num_threads(1)  # shared 2-core machines: more threads are slower and erratic
warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from anyms_core.testing import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline()


@pytest.fixture(scope="session")
def tiny_sd15():
    from anyms_core.testing import tiny_sd15_pipeline

    return tiny_sd15_pipeline()
