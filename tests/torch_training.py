"""For tests (and tools/agscl_graphs.py) that train torch networks: the digits as the 3-channel images that
ImageNet-style networks and `torch_nets.ResCat` take, and a one-torch-thread fixture."""
import numpy as np
import pytest
import torch

from edgecl.train.data import Stream, make_stream


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread, as `edgecl train` uses: on a busy 2-core machine two threads made small convolutions ~10×
    slower in wall time (measured 20 s vs 1.9 s for a resnet-preset run). Modules that train convs take it with
    `_threads = one_torch_thread`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rgb_digits(stream: str, size: int, n_tasks: int) -> Stream:
    """A digits stream as 3-channel size×size images (bilinear upsampling, the channel repeated)."""
    def up(x: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(x).repeat(1, 3, 1, 1)
        return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear").numpy()

    return Stream.from_arrays(f"{stream}-rgb{size}", [(up(t.x_train), t.y_train, up(t.x_test), t.y_test)
                                                      for t in make_stream(stream, n_tasks, seed=0).tasks])
