"""Patch centres: class-balanced frequencies (chi-square), absent classes, uniform centres, positions."""
import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import chisquare

from medseg_dl.config.params import Params
from medseg_dl.data.preprocess import class_locations
from medseg_dl.pipeline import sampling

SEED = tf.constant([7, 11], tf.int64)


def labelled_volume(classes, shape=(12, 10, 8), max_per_class=50):
    """A decoded-volume dict whose label holds `classes` in horizontal slabs (unequal voxel counts)."""
    label = np.zeros(shape, np.int32)
    for i, k in enumerate(classes):
        label[i * 3: (i + 1) * 3 + (2 if i == len(classes) - 1 else 0)] = k
    locations, counts, _ = class_locations(label, 3, max_per_class, np.random.default_rng(0))
    return {"label": label, "class_locations": tf.constant(locations), "class_location_counts": tf.constant(counts),
            "shape": tf.constant(shape, tf.int32)}


def sampling_params(probabilities):
    return Params.from_dict({"data": {"num_classes": 3},
                             "sampling": {"class_probabilities": probabilities}}).sampling


def drawn_classes(volume, probabilities, count=3000):
    centres = sampling.patch_centres(volume, sampling_params(probabilities), count, SEED).numpy()
    assert centres.shape == (count, 3) and centres.dtype == np.int32
    return volume["label"][tuple(centres.T)]


def test_class_frequencies_follow_the_configured_probabilities():
    volume = labelled_volume([0, 1, 2])
    probabilities = [0.2, 0.3, 0.5]
    observed = np.bincount(drawn_classes(volume, probabilities), minlength=3)
    assert chisquare(observed, np.array(probabilities) * observed.sum()).pvalue > 0.001


def test_default_is_equal_over_the_classes_present():
    volume = labelled_volume([0, 2])  # class 1 absent
    observed = np.bincount(drawn_classes(volume, None), minlength=3)
    assert observed[1] == 0
    assert chisquare(observed[[0, 2]]).pvalue > 0.001


def test_absent_class_probability_is_renormalised_away():
    volume = labelled_volume([0, 2])
    observed = np.bincount(drawn_classes(volume, [0.25, 0.5, 0.25]), minlength=3)
    assert observed[1] == 0
    assert chisquare(observed[[0, 2]]).pvalue > 0.001


def test_only_absent_classes_wanted_falls_back_to_uniform_centres():
    volume = labelled_volume([0, 2])
    centres = sampling.patch_centres(volume, sampling_params([0.0, 1.0, 0.0]), 500, SEED).numpy()
    assert np.all(centres >= 0) and np.all(centres < np.array([12, 10, 8]))
    assert len(np.unique(centres, axis=0)) > 300  # spread over the volume, not one stored location


def test_centres_are_stored_locations():
    volume = labelled_volume([0, 1, 2])
    centres = sampling.patch_centres(volume, sampling_params(None), 400, SEED).numpy()
    stored = {tuple(v) for v in volume["class_locations"].numpy()}
    assert all(tuple(c) in stored for c in centres)


def test_empty_list_draws_uniform_centres():
    shape = np.array([6, 5, 4])
    centres = sampling.patch_centres({"shape": tf.constant(shape, tf.int32)}, sampling_params([]), 12000,
                                     SEED).numpy()
    assert np.all(centres >= 0) and np.all(centres < shape)
    counts = np.bincount(np.ravel_multi_index(tuple(centres.T), shape), minlength=int(shape.prod()))
    assert chisquare(counts).pvalue > 0.001


def test_same_seed_same_centres_and_different_seed_differs():
    volume = labelled_volume([0, 1, 2])
    params = sampling_params(None)
    first = sampling.patch_centres(volume, params, 50, SEED).numpy()
    again = sampling.patch_centres(volume, params, 50, SEED).numpy()
    other = sampling.patch_centres(volume, params, 50, tf.constant([7, 12], tf.int64)).numpy()
    assert np.array_equal(first, again) and not np.array_equal(first, other)


IGNORE = 3  # not a class of labelled_volume's 3


def partly_ignored_volume(ignored_rows, classes=(0, 1, 2)):
    """labelled_volume with the x-rows `ignored_rows` set to the ignore label (their class locations dropped,
    as conversion stores them) and its class_voxels."""
    volume = labelled_volume(classes)
    label = volume["label"].copy()
    label[ignored_rows] = IGNORE
    locations, counts, voxels = class_locations(label, 3, 50, np.random.default_rng(0))
    return {**volume, "label": label, "class_locations": tf.constant(locations),
            "class_location_counts": tf.constant(counts), "class_voxels": tf.constant(voxels)}


@pytest.mark.parametrize("probabilities", [[], None, [0.0, 0.0, 1.0]])
def test_no_centre_is_an_ignored_voxel(probabilities):
    volume = partly_ignored_volume(slice(6, 12), classes=(0, 1, 1))  # class 2 absent: [0, 0, 1] falls back
    centres = sampling.patch_centres(volume, sampling_params(probabilities), 2000, SEED, IGNORE).numpy()
    assert np.all(volume["label"][tuple(centres.T)] != IGNORE)
    if probabilities is not None:  # uniform draws: without the ignore label some land on ignored voxels
        without = sampling.patch_centres(volume, sampling_params(probabilities), 2000, SEED).numpy()
        assert np.any(volume["label"][tuple(without.T)] == IGNORE)


def test_uniform_centres_with_an_ignore_label_are_uniform_over_the_annotated_voxels():
    volume = partly_ignored_volume(slice(0, 2))
    label = volume["label"]
    drawn = label[tuple(sampling.patch_centres(volume, sampling_params([]), 6000, SEED, IGNORE).numpy().T)]
    observed = np.bincount(drawn, minlength=3)[:3]
    annotated = np.bincount(label[label != IGNORE], minlength=3)
    assert chisquare(observed, annotated / annotated.sum() * observed.sum()).pvalue > 0.001


@pytest.mark.parametrize("size", [[4, 5, 1], [40, 56, 40]])
def test_starts_middles_and_positions(size):
    centres = tf.constant([[3, 3, 0], [0, 9, 0]], tf.int32)
    starts = sampling.patch_starts(centres, size).numpy()
    np.testing.assert_array_equal(starts + np.array(size) // 2, centres)
    middles = sampling.patch_middles(starts, size).numpy()
    np.testing.assert_array_equal(middles, starts + (np.array(size) - 1) / 2)  # mean of the covered voxels
    shape = np.array([7, 10, 1])
    positions = sampling.patch_positions(starts, size, shape).numpy()
    np.testing.assert_allclose(positions, np.clip(middles / np.maximum(shape - 1, 1), 0.0, 1.0), rtol=1e-6)
    if size == [4, 5, 1]:  # middles (2.5, 3, 0) and (-0.5, 9, 0): the second clipped at the border
        np.testing.assert_allclose(positions, [[2.5 / 6, 3 / 9, 0.0], [0.0, 1.0, 0.0]], rtol=1e-6)
