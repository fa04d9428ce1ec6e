import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # the oracles must never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
GOLDEN_CKPT = GOLDEN / "tiny-sd-a.safetensors"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_sd():
    """The golden tiny checkpoint (the reference's outputs were made with it), fp32 on the CPU."""
    from weights_tools import load_checkpoint

    sd = load_checkpoint(GOLDEN_CKPT, device="cpu", dtype=torch.float32)
    sd.requires_grad_(False)
    return sd.eval()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on a small shared CPU, torch's thread pool fighting other
    processes runs several times slower than one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The quick subset, `python -m pytest -q -m "not slow"`, leaves these modules out: the parity tests against
# diffusers / transformers / open_clip, the golden outputs, the notebooks and the precision tests
# (registered in setup.cfg; CI runs everything).
SLOW = ("test_parity_", "test_golden", "test_notebooks", "test_precision", "test_sweep_dist", "test_miniature_claims")


def is_slow(path) -> bool:
    return Path(path).name.startswith(SLOW)


def pytest_collection_modifyitems(items):
    for item in items:
        if is_slow(item.path):
            item.add_marker(pytest.mark.slow)
