"""The post-processing decision in TensorFlow ops (inference/postprocess_graph.py) equals the numpy reference
(inference/postprocess.py `apply`) voxel for voxel: random label maps, ties, corner contacts, empty classes,
inside a tf.function of unknown shape (as in the exported SavedModel)."""
import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.inference import postprocess, postprocess_graph

ALL_STEPS = {"foreground_largest_component": True, "largest_component_classes": [2, 1],
             "min_island_mm3": {"1": 3.0, "2": 2.5}}
DECISIONS = [ALL_STEPS, postprocess.NOTHING,
             {**postprocess.NOTHING, "foreground_largest_component": True},
             {**postprocess.NOTHING, "largest_component_classes": [1, 2]},
             {**postprocess.NOTHING, "min_island_mm3": {"2": 4.0, "1": 1.7}}]
SHAPES = [(9, 11, 7), (5, 4, 6), (1, 8, 3), (12, 3, 10)]


def in_graph(decision):
    """postprocess_graph.apply of `decision` as a tf.function of labels (None, None, None) int32 and
    spacing_mm (3,) float32."""
    return tf.function(lambda labels, spacing_mm: postprocess_graph.apply(labels, decision, spacing_mm),
                       input_signature=[tf.TensorSpec([None, None, None], tf.int32), tf.TensorSpec([3], tf.float32)])


def reference(labels, decision, spacing_mm):
    """postprocess.apply with the float32 spacing's values in float64 (what the graph receives)."""
    return postprocess.apply(labels, decision, np.asarray(spacing_mm, np.float32).astype(np.float64).tolist())


def random_labels(rng, shape):
    """Labels (X, Y, Z) int32 in 0..2: random blobs of each class (dilated seeds of random density)."""
    labels = np.zeros(shape, np.int32)
    for c in (1, 2):
        seeds = rng.uniform(size=shape) < rng.uniform(0.02, 0.3)
        grown = seeds | (np.roll(seeds, 1, axis=int(rng.integers(3))) & (rng.uniform(size=shape) < 0.7))
        labels[grown] = c
    return labels


@pytest.mark.parametrize("decision", DECISIONS)
def test_random_label_maps_are_post_processed_as_the_numpy_reference(decision):
    rng = np.random.default_rng(len(str(decision)))
    function = in_graph(decision)
    changed = 0
    for i in range(40):
        labels = random_labels(rng, SHAPES[i % len(SHAPES)])
        spacing_mm = rng.choice([0.5, 0.7, 1.0, 1.3, 2.5], size=3).astype(np.float32)
        expected = reference(labels, decision, spacing_mm)
        got = function(labels, spacing_mm).numpy()
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, expected, err_msg=f"{decision} {spacing_mm}\n{labels}")
        changed += int((expected != labels).sum())
    assert changed > 0 or decision == postprocess.NOTHING


def test_thresholds_exactly_on_a_component_size_keep_it_as_numpy_does():
    """Island thresholds of k voxels times the float64 voxel volume: numpy's float64 comparison, bit for bit."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        labels = random_labels(rng, (9, 11, 7))
        spacing_mm = rng.uniform(0.3, 3.0, size=3).astype(np.float32)
        voxel_mm3 = float(np.prod(spacing_mm.astype(np.float64)))
        decision = {**postprocess.NOTHING, "min_island_mm3": {"1": 2 * voxel_mm3, "2": 3 * voxel_mm3}}
        np.testing.assert_array_equal(postprocess_graph.apply(tf.constant(labels), decision, spacing_mm).numpy(),
                                      reference(labels, decision, spacing_mm))


def test_equally_large_components_keep_the_first_in_raster_order():
    labels = np.zeros((6, 7, 5), np.int32)
    labels[3, 0, 0:2] = 1  # first voxel at linear index 3 * 35
    labels[0, 5, 3:5] = 1  # first voxel at 5 * 5 + 3: the first in raster order, of the same size
    labels[5, 6, 0:2] = 1
    expected = np.zeros_like(labels)
    expected[0, 5, 3:5] = 1
    decision = {**postprocess.NOTHING, "largest_component_classes": [1]}
    np.testing.assert_array_equal(reference(labels, decision, (1, 1, 1)), expected)
    np.testing.assert_array_equal(in_graph(decision)(labels, [1.0, 1.0, 1.0]).numpy(), expected)


def test_components_touching_at_a_corner_or_an_edge_are_one():
    """26-connectivity: a diagonal chain of 9 voxels (corners only) and an edge-touching pair are one
    component each; with 6-connectivity the 2 x 2 x 2 cube would be the largest of class 1."""
    labels = np.zeros((14, 14, 14), np.int32)
    labels[:2, :2, :2] = 1
    for k in range(4, 13):
        labels[k, k, k] = 1
    labels[0, 10, 10] = labels[1, 11, 10] = 2  # an edge
    labels[0, 13, 0] = 2
    expected = labels.copy()
    expected[:2, :2, :2] = 0
    expected[0, 13, 0] = 0
    decision = {**postprocess.NOTHING, "largest_component_classes": [1], "min_island_mm3": {"2": 2.0}}
    np.testing.assert_array_equal(reference(labels, decision, (1, 1, 1)), expected)
    np.testing.assert_array_equal(in_graph(decision)(labels, [1.0, 1.0, 1.0]).numpy(), expected)


@pytest.mark.parametrize("fill", [0, 1, 2])
def test_empty_classes_and_uniform_volumes_stay_unchanged(fill):
    labels = np.full((4, 5, 3), fill, np.int32)
    got = in_graph(ALL_STEPS)(labels, [1.0, 2.0, 0.5]).numpy()
    np.testing.assert_array_equal(got, reference(labels, ALL_STEPS, (1.0, 2.0, 0.5)))
    np.testing.assert_array_equal(got, labels)


def test_component_ids_name_the_first_voxel_of_each_component():
    mask = np.zeros((3, 4, 5), bool)
    mask[0, 1, 2:5] = mask[1, 2, 4] = True  # one component (first voxel 0*20 + 1*5 + 2 = 7)
    mask[2, 3, 0] = True  # alone: 2*20 + 3*5 + 0 = 55
    ids = postprocess_graph.component_ids(tf.constant(mask)).numpy()
    expected = np.full(mask.shape, postprocess_graph.NO_ID, np.int32)
    expected[0, 1, 2:5] = expected[1, 2, 4] = 8
    expected[2, 3, 0] = 56
    np.testing.assert_array_equal(ids, expected)
