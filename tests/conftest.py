import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("CORRPRUNE_THREADS", 2)))


@pytest.fixture(autouse=True)
def _seed():
    from corrprune_edu.core import set_seed
    set_seed(0)
