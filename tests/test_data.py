"""Task streams: real digits, fixed seeded splits, user data through the documented API."""
import re

import numpy as np
import pytest

from edgecl.errors import UsageError
from edgecl.train.data import Stream, StreamTooShort, check_stream, load_stream_file, make_stream


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


# ---------------------------------------------------------------- your own data: what training refuses, up front

def _tasks(n=2, size=12):
    """n small float32 tasks of 3 classes as the keys of a stream file."""
    rng, out = np.random.default_rng(1), {}
    for i in range(n):
        for split, count in (("train", size), ("test", size // 2)):
            out[f"task{i}_x_{split}"] = rng.random((count, 1, 8, 8)).astype(np.float32)
            out[f"task{i}_y_{split}"] = np.arange(count) % 3
    return out


def _file(tmp_path, name="mine.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **{k: v for k, v in {**_tasks(), **arrays}.items() if v is not None})
    return str(path)


@pytest.mark.parametrize("field, value, needles", [
    # finite in float64, inf once cast to the float32 the model computes in
    ("task0_x_test", np.full((6, 1, 8, 8), 1e300), ["task 0 x_test", "beyond float32's range", "1e+300"]),
    ("task1_x_train", np.full((12, 1, 8, 8), np.inf), ["task 1 x_train", "NaN or infinite"]),
    ("task0_x_train", np.zeros((12, 1, 8, 8), "datetime64[s]"), ["task 0 x_train", "datetime64", "not real numbers"]),
    ("task0_x_train", np.ones((12, 1, 8, 8), complex), ["complex128", "not real numbers"]),
    ("task0_x_train", np.full((12, 1, 8, 8), "a"), ["<U1", "not real numbers"]),
    ("task0_x_test", np.zeros((6, 1, 8, 8), np.uint8), ["task 0 x_test", "uint8", "runtime refuses integer"]),
    ("task0_x_train", np.zeros((12, 1, 8, 8), bool), ["dtype bool", "floating point"]),
    ("task0_y_train", np.full(12, 2 ** 40), ["task 0 y_train", "label 1099511627776", "at most 65536 classes"]),
    ("task1_y_test", np.full(6, 2 ** 63, np.uint64), ["task 1 y_test", "label 9223372036854775808"]),
    ("task0_y_train", np.full(12, 70000), ["label 70000", "at most 65536 classes"]),
    ("task0_y_train", np.zeros(12, np.float32), ["task 0 y_train", "labels must be integers"]),
])
def test_a_stream_file_with_inputs_or_labels_training_cannot_use_is_refused(tmp_path, field, value, needles):
    path = _file(tmp_path, **{field: value})
    with pytest.raises(UsageError) as info:
        make_stream(path)
    for needle in [path, *needles]:
        assert needle in str(info.value)


def test_object_and_masked_arrays_are_refused():
    x, y = np.ones((5, 4), np.float32), np.arange(5) % 2
    with pytest.raises(UsageError, match="task 0 x_train has dtype object"):
        Stream.from_arrays("mine", [(x.astype(object), y, x, y)])
    with pytest.raises(UsageError, match="task 0 x_test is a numpy masked array"):
        Stream.from_arrays("mine", [(x, y, np.ma.masked_array(x, x > 0), y)])


@pytest.mark.parametrize("arrays, needle", [
    ({**{k.replace("task1", "task3"): v for k, v in _tasks(2).items() if k.startswith("task1")}},
     "has tasks [0, 1, 3] but no task2"),                                   # a gap: task3 was silently dropped
    ({"task1_x_train": None, "task1_x_trian": np.zeros((12, 1, 8, 8), np.float32)},
     "unexpected arrays ['task1_x_trian']"),                                # a typo: task 1 and later were dropped
    ({"task01_x_train": np.zeros((12, 1, 8, 8), np.float32)}, "unexpected arrays ['task01_x_train']"),
    ({"notes": np.zeros(3)}, "unexpected arrays ['notes']"),
    ({"task1_y_test": None}, "missing arrays ['task1_y_test']"),
])
def test_a_stream_file_never_loses_tasks_silently(tmp_path, arrays, needle):
    with pytest.raises(UsageError, match=re.escape(needle)):
        make_stream(_file(tmp_path, **arrays))


def test_tasks_takes_the_first_tasks_of_a_file_and_refuses_more_than_it_holds(tmp_path):
    path = _file(tmp_path, **_tasks(3))
    assert [t.name for t in make_stream(path).tasks] == ["mine-0", "mine-1", "mine-2"]
    one = make_stream(path, 1)
    assert [t.name for t in one.tasks] == ["mine-0"]
    np.testing.assert_array_equal(one.tasks[0].x_train, _tasks(3)["task0_x_train"])
    with pytest.raises(StreamTooShort, match="holds 3 tasks, fewer than the 4 asked for") as info:
        make_stream(path, 4)
    assert info.value.held == 3


@pytest.mark.parametrize("stem, needle", [("3", "reads as a task range"), ("2024", "reads as a task range"),
                                          (".hidden", "no leading '.'"), ("a,b", "contains ','"),
                                          ("x" * 127, "1-128 printable characters")])
def test_a_file_name_that_makes_bad_task_names_is_refused_naming_the_file(tmp_path, stem, needle):
    path = _file(tmp_path, f"{stem}.npz")
    with pytest.raises(UsageError) as info:
        make_stream(path)
    text = str(info.value)
    assert path in text and "task names come from the file name" in text and needle in text
    assert "rename the file" in text


def test_task_counts_and_data_sizes_are_bounded_before_any_data_is_built():
    with pytest.raises(UsageError, match="number of tasks must be 1-65536"):
        check_stream("permuted-digits", 100_000)  # the artifact's MAX_TASKS
    with pytest.raises(UsageError, match="GiB of data, more than this machine's"):
        check_stream("permuted-digits", 60_000, (3, 512, 512))
    with pytest.raises(StreamTooShort, match="split-digits has 5 tasks"):
        check_stream("split-digits", 6)
    check_stream("permuted-digits", 1_000)  # 0.4 GB: a long stream that fits is allowed
