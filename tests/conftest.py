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
def _torch_threads():
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.set_num_threads(2)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train faster on one thread: on shared cores torch's intra-op threads cost far more than they give.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
