"""The case store: what is written is read back exactly (float16 image, uint8 label, class locations), whole
or any box of it, by TensorFlow ops and by numpy; only the chunks a box touches are read."""
import os

import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.data import store


def random_case(shape, channels, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 2, (*shape, channels)).astype(np.float32)
    label = rng.integers(0, 4, shape).astype(np.uint8)
    locations = np.argwhere(label > 0)[:50].astype(np.int32)
    return image, label, locations


@pytest.mark.parametrize("shape, channels, chunk", [((13, 9, 7), 1, (4, 4, 4)), ((8, 8, 8), 2, (8, 8, 8)),
                                                    ((17, 5, 11), 3, (5, 3, 4))])
def test_a_written_case_reads_back_whole_and_in_boxes(tmp_path, shape, channels, chunk):
    image, label, locations = random_case(shape, channels)
    path = str(tmp_path / store.case_name("s"))
    store.write_case(path, image, label, {"class_locations": locations}, {"shape": list(shape), "channels": channels},
                     chunk)
    expected = image.astype(np.float16).astype(np.float32)
    volume = store.read_volume(tf.constant(path), tf.constant(shape, tf.int32), channels, chunk)
    np.testing.assert_array_equal(volume["image"].numpy(), expected)
    np.testing.assert_array_equal(volume["label"].numpy(), label)
    np.testing.assert_array_equal(volume["class_locations"].numpy(), locations)
    rng = np.random.default_rng(1)
    for _ in range(10):
        start = rng.integers(0, shape)
        size = np.array([rng.integers(1, n - s + 1) for n, s in zip(shape, start)])
        box = tuple(slice(a, a + n) for a, n in zip(start, size))
        got_image, got_label = store.read_box(tf.constant(path), tf.constant(start, tf.int32),
                                              tf.constant(size, tf.int32), channels, chunk)
        np.testing.assert_array_equal(got_image.numpy(), expected[box])
        np.testing.assert_array_equal(got_label.numpy(), label[box])
    arrays = store.read_arrays(path)
    np.testing.assert_array_equal(arrays["image"], image.astype(np.float16))
    np.testing.assert_array_equal(arrays["label"], label)
    assert arrays["meta"]["chunk_vox"] == list(chunk)


def test_a_box_reads_only_its_chunks(tmp_path):
    image, label, locations = random_case((16, 16, 16), 1)
    path = str(tmp_path / store.case_name("s"))
    store.write_case(path, image, label, {"class_locations": locations}, {"shape": [16, 16, 16], "channels": 1},
                     (8, 8, 8))
    for name in ("image", "label"):
        os.remove(os.path.join(path, name, "1.1.1"))  # the far corner chunk
    got_image, _ = store.read_box(tf.constant(path), tf.constant([0, 0, 0]), tf.constant([8, 16, 16]), 1, (8, 8, 8))
    np.testing.assert_array_equal(got_image.numpy(), image[:8].astype(np.float16).astype(np.float32))
    with pytest.raises(tf.errors.NotFoundError):
        store.read_box(tf.constant(path), tf.constant([8, 8, 8]), tf.constant([1, 1, 1]), 1, (8, 8, 8))


def test_every_finite_float16_bit_pattern_decodes_to_its_exact_float32_value():
    """The reader decodes float16 with integer arithmetic (no float16 tensor, which oneDNN reports on CPUs
    without AVX-512): each of the 63488 finite patterns (signed zeros and subnormals included) gives numpy's
    value, bit for bit."""
    patterns = np.arange(2 ** 16, dtype=np.uint16)
    finite = patterns[np.isfinite(patterns.view(np.float16))]
    got = store.float16_bits_to_float32(tf.constant(finite.astype(np.int32))).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), finite.view(np.float16).astype(np.float32).view(np.uint32))
