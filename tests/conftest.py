import os
import sys

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, Triton kernels run through the interpreter; it must be on before any @triton.jit
# decorator runs (module import).  The dispatcher still sends CPU tensors to the references unless
# a test forces impl="triton".
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny matmuls on a 2-core machine shared by the xdist workers only
    contend with more (up to 100x slower measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)



@pytest.fixture(autouse=True)
def _no_open_figures():
    """A plot the library saves must also close its figure: a long session (a report, a memorize sweep) that
    left one open per plot would hold them all in memory.  Checked only where pyplot was imported."""
    yield
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None and plt.get_fignums():
        n = len(plt.get_fignums())
        plt.close("all")
        pytest.fail(f"{n} matplotlib figure(s) left open")
