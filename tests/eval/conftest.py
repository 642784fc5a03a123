import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The benchmark runs are tiny: on a shared 2-core box, one intra-op thread avoids oversubscription
    # stalls (tens of seconds per run) without slowing an idle machine much.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
