"""The post-processing decision in TensorFlow ops (inference/postprocess_graph.py) equals the numpy reference
(inference/postprocess.py `apply`) voxel for voxel: random label maps, ties, corner contacts, empty classes,
regions, inside a tf.function of unknown shape (as in the exported SavedModel); what a voxel removed from a
region becomes."""
import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.data.targets import Region, Targets
from medseg_dl.inference import postprocess, postprocess_graph

CLASSES = Targets(3, ("background", "one", "two"))
# BraTS's nested regions over labels 1 (edema), 2 (necrosis), 3 (enhancing), painted in this order
REGIONS = Targets(4, ("background", "edema", "necrosis", "enhancing"),
                  (Region("whole", (1, 2, 3), 1), Region("core", (2, 3), 2), Region("enhancing", (3,), 3)))

ALL_STEPS = {"foreground_largest_component": True, "largest_component_classes": [2, 1],
             "min_island_mm3": {"1": 3.0, "2": 2.5}}
DECISIONS = [ALL_STEPS, postprocess.NOTHING,
             {**postprocess.NOTHING, "foreground_largest_component": True},
             {**postprocess.NOTHING, "largest_component_classes": [1, 2]},
             {**postprocess.NOTHING, "min_island_mm3": {"2": 4.0, "1": 1.7}}]
REGION_DECISIONS = [ALL_STEPS, {**postprocess.NOTHING, "largest_component_classes": [3, 2]},
                    {**postprocess.NOTHING, "min_island_mm3": {"3": 2.0, "1": 4.0}},
                    {**postprocess.NOTHING, "largest_component_classes": [1], "min_island_mm3": {"2": 3.0}}]
SHAPES = [(9, 11, 7), (5, 4, 6), (1, 8, 3), (12, 3, 10)]


def in_graph(decision, targets=CLASSES):
    """postprocess_graph.apply of `decision` as a tf.function of labels (None, None, None) int32 and
    spacing_mm (3,) float32."""
    return tf.function(lambda labels, spacing_mm: postprocess_graph.apply(labels, decision, spacing_mm, targets),
                       input_signature=[tf.TensorSpec([None, None, None], tf.int32), tf.TensorSpec([3], tf.float32)])


def reference(labels, decision, spacing_mm, targets=CLASSES):
    """postprocess.apply with the float32 spacing's values in float64 (what the graph receives)."""
    return postprocess.apply(labels, decision, np.asarray(spacing_mm, np.float32).astype(np.float64).tolist(),
                             targets)


def random_labels(rng, shape, values=(1, 2)):
    """Labels (X, Y, Z) int32 in 0..max(values): random blobs of each value (dilated seeds of random density)."""
    labels = np.zeros(shape, np.int32)
    for c in values:
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
        np.testing.assert_array_equal(postprocess_graph.apply(tf.constant(labels), decision, spacing_mm,
                                                              CLASSES).numpy(),
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


@pytest.mark.parametrize("decision", REGION_DECISIONS)
def test_random_painted_maps_are_post_processed_per_region_as_the_numpy_reference(decision):
    """Structure s is the s-th region; painted maps of labels 0..3 (nested regions) in the graph and numpy."""
    rng = np.random.default_rng(len(str(decision)) + 1)
    function = in_graph(decision, REGIONS)
    changed = 0
    for i in range(30):
        labels = random_labels(rng, SHAPES[i % len(SHAPES)], values=(1, 2, 3))
        spacing_mm = rng.choice([0.5, 1.0, 1.3], size=3).astype(np.float32)
        expected = reference(labels, decision, spacing_mm, REGIONS)
        np.testing.assert_array_equal(function(labels, spacing_mm).numpy(), expected, err_msg=f"{decision}")
        changed += int((expected != labels).sum())
    assert changed > 0


def test_a_voxel_removed_from_a_region_is_painted_by_the_regions_that_still_hold_it():
    """Nested regions whole [1, 2, 3] (paints 1), core [2, 3] (2), enhancing [3] (3), each keeping its largest
    component: an enhancing island inside the whole tumour becomes core (2); removed from the core, it and a
    core island of labels 2 and 3 become whole tumour only (1), as they must leave the core; a whole-tumour
    island goes to 0. With labels instead of regions every removed voxel goes to 0."""
    labels = np.zeros((12, 6, 6), np.int32)
    labels[0:4, 0:3, 0:3] = 3  # the largest enhancing (and core) component
    labels[0:4, 3:6, 0:3] = 1  # with it, the largest whole-tumour component
    labels[4, 4, 1] = 3  # an enhancing and core island, inside the whole tumour
    labels[9, 0:2, 0] = 2  # a core island of labels 2 and 3, a whole-tumour island too
    labels[9, 2, 0] = 3
    labels[11, 5, 5] = 1  # a whole-tumour island
    enhancing_then_whole = {**postprocess.NOTHING, "largest_component_classes": [3, 1]}
    expected = labels.copy()
    expected[4, 4, 1] = 2
    expected[9, 0:3, 0] = expected[11, 5, 5] = 0
    np.testing.assert_array_equal(reference(labels, enhancing_then_whole, (1, 1, 1), REGIONS), expected)
    core = {**postprocess.NOTHING, "largest_component_classes": [2]}
    expected = labels.copy()
    expected[4, 4, 1] = 1
    expected[9, 0:3, 0] = 1
    np.testing.assert_array_equal(reference(labels, core, (1, 1, 1), REGIONS), expected)
    for decision in (enhancing_then_whole, core):
        np.testing.assert_array_equal(in_graph(decision, REGIONS)(labels, [1.0, 1.0, 1.0]).numpy(),
                                      reference(labels, decision, (1, 1, 1), REGIONS))
    expected = labels.copy()
    expected[4, 4, 1] = expected[9, 2, 0] = 0
    class_3 = {**postprocess.NOTHING, "largest_component_classes": [3]}
    np.testing.assert_array_equal(reference(labels, class_3, (1, 1, 1), Targets(4, REGIONS.class_names)), expected)
    with pytest.raises(ValueError, match="structure = 4: the decision names a structure these targets do not have"):
        reference(labels, {**postprocess.NOTHING, "largest_component_classes": [4]}, (1, 1, 1), REGIONS)
