import os

import pytest
import torch

# Keep CPU tests deterministic and light on our 2-core machines.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
