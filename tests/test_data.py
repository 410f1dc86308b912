"""Task streams: real digits, fixed seeded splits, user data through the documented API."""
import numpy as np
import pytest

from edgecl.errors import UsageError
from edgecl.train.data import Stream, load_stream_file, make_stream


def test_permuted_digits_is_seeded_and_permutes_pixels():
    a, b = make_stream("permuted-digits", 3, seed=0), make_stream("permuted-digits", 3, seed=0)
    assert len(a.tasks) == 3 and a.input_shape == (1, 8, 8)
    np.testing.assert_array_equal(a.tasks[2].x_train, b.tasks[2].x_train)
    t0, t1 = a.tasks[0], a.tasks[1]
    # same images, same labels, pixels rearranged: per-image sorted pixel values agree
    np.testing.assert_array_equal(t0.y_train, t1.y_train)
    np.testing.assert_allclose(np.sort(t0.x_train.reshape(len(t0.x_train), -1), 1),
                               np.sort(t1.x_train.reshape(len(t1.x_train), -1), 1))
    assert not np.array_equal(t0.x_train, t1.x_train)
    assert t0.x_train.dtype == np.float32 and 0 <= t0.x_train.min() and t0.x_train.max() <= 1


def test_split_digits_two_classes_each():
    s = make_stream("split-digits")
    assert len(s.tasks) == 5
    for t in s.tasks:
        assert t.n_classes == 2 and set(np.unique(t.y_train)) == {0, 1}


def test_rotated_digits_changes_images():
    s = make_stream("rotated-digits", 3)
    assert not np.allclose(s.tasks[0].x_test, s.tasks[1].x_test)


def test_user_arrays_and_npz_file(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((20, 4)).astype(np.float32), rng.integers(0, 3, 20)
    s = Stream.from_arrays("mine", [(x, y, x, y)])
    assert s.input_shape == (4,) and s.tasks[0].n_classes == 3
    path = tmp_path / "mine.npz"
    np.savez(path, task0_x_train=x, task0_y_train=y, task0_x_test=x, task0_y_test=y)
    assert load_stream_file(str(path)).tasks[0].x_train.shape == (20, 4)


@pytest.mark.parametrize("bad", [
    lambda x, y: [(x, y, x)],                       # three items
    lambda x, y: [(x, y[:-1], x, y)],               # length mismatch
    lambda x, y: [(x, -y - 1, x, y)],               # negative labels
    lambda x, y: [(x * np.nan, y, x, y)],           # NaN inputs
    lambda x, y: [(x, y, x, y), (x[:, :3], y, x[:, :3], y)],  # shapes differ between tasks
])
def test_bad_user_data_rejected(bad):
    x, y = np.ones((5, 4), np.float32), np.arange(5) % 2
    with pytest.raises(UsageError):
        Stream.from_arrays("bad", bad(x, y))


def test_unknown_stream_and_bad_file(tmp_path):
    with pytest.raises(UsageError, match="unknown stream"):
        make_stream("mnist")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match="junk.npz"):
        load_stream_file(str(junk))


def test_digit_streams_resize_to_an_input_shape():
    small = make_stream("permuted-digits", 2, 0)
    big = make_stream("permuted-digits", 2, 0, input_shape=(3, 32, 32))
    assert big.input_shape == (3, 32, 32)
    for s, b in zip(small.tasks, big.tasks):
        assert b.x_train.shape == (len(s.x_train), 3, 32, 32) and b.x_train.dtype == np.float32
        assert np.array_equal(b.y_train, s.y_train) and np.array_equal(b.x_train[:, 0], b.x_train[:, 2])
        assert 0.0 <= b.x_train.min() and b.x_train.max() <= 1.0
        # the same task: every 8×8 pixel became a 4×4 block of the 32×32 image
        assert np.array_equal(b.x_train[:, 0, ::4, ::4], s.x_train[:, 0])
        assert np.array_equal(b.x_train[:, 0, 3::4, 3::4], s.x_train[:, 0])
    assert make_stream("split-digits", 1, 0, input_shape=(1, 8, 8)).input_shape == (1, 8, 8)


@pytest.mark.parametrize("shape, needle", [((2, 32, 32), "1 or 3 channels"), ((3, 4, 4), "sides from 8"),
                                           ((32, 32), "channels,height,width")])
def test_bad_input_shapes_are_refused(shape, needle):
    with pytest.raises(UsageError, match=needle):
        make_stream("split-digits", 1, 0, input_shape=shape)
