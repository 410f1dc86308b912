import importlib.util
import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _has_cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    cuda = _has_cuda()
    trt = importlib.util.find_spec("tensorrt") is not None and cuda
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "tensorrt" in item.keywords and not trt:
            item.add_marker(pytest.mark.skip(reason="needs the tensorrt package and a CUDA GPU"))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread, as `edgecl train` uses by default: the test models are small, and on a busy 2-core machine
    intra-op threads made small convolutions ~10× slower in wall time (20 s vs 1.9 s for a resnet-preset run)."""
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(1)
    yield
