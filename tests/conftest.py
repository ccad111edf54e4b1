import pytest
import torch

# Keep CPU tests deterministic and light on our 2-core machines.
torch.set_num_threads(1)  # small models on a shared 2-core box run far faster on one thread


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
