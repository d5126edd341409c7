import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIFAR_DIR = ROOT.parent / "shared" / "data" / "cifar10-jpeg"

torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def require_cifar() -> Path:
    """The real CIFAR-10 JPEGs from ../shared; skip (a user's clone) or fail (CI) without them."""
    if (CIFAR_DIR / "cifar10-jpeg-train.tar.gz").exists():
        return CIFAR_DIR
    if os.environ.get("NAS_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(f"NAS_REQUIRE_SHARED_DATA=1 but {CIFAR_DIR} has no CIFAR-10 tarballs")
    pytest.skip(f"real CIFAR-10 JPEGs not found at {CIFAR_DIR}")


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
