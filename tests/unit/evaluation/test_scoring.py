"""medseg_dl.scoring against analytic shapes and a brute-force full-volume reference; regions and the ignore label
against hand-computed masks."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from medseg_dl.data.targets import Region, Targets
from medseg_dl.errors import DataError
from medseg_dl.evaluation.scoring import ScoringInputError, dice, score_case, summarize

ANISOTROPIC = (0.8, 0.8, 2.5)


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def box_mask(shape, lower, upper):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(lo, hi) for lo, hi in zip(lower, upper))] = True
    return mask


def classes(num_classes, ignore_label=None):
    """The Targets of labels 0 .. num_classes - 1 named class_<k> (scored: each foreground class alone)."""
    return Targets(num_classes, tuple(f"class_{k}" for k in range(num_classes)), ignore_label=ignore_label)


def labels_of(*masks, shape=None):
    """An int32 label map with masks[i] painted as class i + 1 (later masks win)."""
    labels = np.zeros(shape if shape is not None else masks[0].shape, np.int32)
    for value, mask in enumerate(masks, start=1):
        labels[mask] = value
    return labels


def one(reference, prediction, spacing=(1.0, 1.0, 1.0), tolerance=1.0):
    """The row of class 1 for two boolean masks."""
    return score_case(labels_of(reference), labels_of(prediction), classes(2), spacing, tolerance)[0]


def brute_force(reference, prediction, spacing, tolerance):
    """Independent full-volume reference: scipy erosion (border 0) and full-array EDT."""
    a, b = reference, prediction
    sa, sb = a ^ ndimage.binary_erosion(a), b ^ ndimage.binary_erosion(b)
    pred_to_ref = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    ref_to_pred = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    pooled = np.concatenate([pred_to_ref, ref_to_pred])
    inter = np.logical_and(a, b).sum()
    return {
        "dice": 2 * inter / (a.sum() + b.sum()),
        "jaccard": inter / np.logical_or(a, b).sum(),
        "assd_mm": pooled.mean(),
        "hd95_mm": max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)),
        "surface_dice": np.mean(pooled <= tolerance),
        "reference_mm3": a.sum() * np.prod(spacing),
        "predicted_mm3": b.sum() * np.prod(spacing),
    }


def random_labels(rng, shape, num_classes):
    """Smooth random blobs of classes 1..num_classes-1, many touching the array border."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    levels = np.quantile(field, np.linspace(0.55, 0.97, num_classes)[:-1])
    return ((1 + np.digitize(field, levels[1:])) * (field > levels[0])).astype(np.int32)


def test_concentric_spheres_assd_is_radius_difference():
    shape, centre = (48, 48, 48), (24, 24, 24)
    row = one(ball(shape, centre, 14), ball(shape, centre, 10))
    assert abs(row["assd_mm"] - 4.0) < 0.5
    assert abs(row["hd95_mm"] - 4.0) < 1.0
    assert row["dice"] == pytest.approx(2 * 10 ** 3 / (10 ** 3 + 14 ** 3), rel=0.03)


@pytest.mark.parametrize("spacing, axis, gap, expected_mm", [
    ((1.0, 1.0, 1.0), 2, 2, 2.0),
    (ANISOTROPIC, 2, 2, 5.0),
    (ANISOTROPIC, 0, 3, 2.4),
])
def test_parallel_plates_distance_scales_with_spacing(spacing, axis, gap, expected_mm):
    shape = (32, 32, 32)
    lower, upper = [4, 4, 4], [28, 28, 28]
    ref_lower, ref_upper = list(lower), list(upper)
    ref_lower[axis], ref_upper[axis] = 10, 11
    pred_lower, pred_upper = list(ref_lower), list(ref_upper)
    pred_lower[axis], pred_upper[axis] = 10 + gap, 11 + gap
    row = one(box_mask(shape, ref_lower, ref_upper), box_mask(shape, pred_lower, pred_upper), spacing)
    assert row["assd_mm"] == pytest.approx(expected_mm, rel=1e-12)
    assert row["hd95_mm"] == pytest.approx(expected_mm, rel=1e-12)
    assert row["dice"] == 0.0 and row["surface_dice"] == 0.0


def test_dice_jaccard_and_volumes_of_known_overlap():
    shape = (20, 20, 20)
    reference = box_mask(shape, (2, 2, 2), (12, 12, 12))
    prediction = box_mask(shape, (4, 2, 2), (14, 12, 12))
    row = one(reference, prediction, ANISOTROPIC)
    assert row["dice"] == pytest.approx(0.8, rel=1e-12)
    assert row["jaccard"] == pytest.approx(2 / 3, rel=1e-12)
    assert row["reference_mm3"] == pytest.approx(1000 * 0.8 * 0.8 * 2.5)
    assert row["predicted_mm3"] == pytest.approx(1000 * 0.8 * 0.8 * 2.5)
    assert dice(reference, prediction) == pytest.approx(0.8, rel=1e-12)


@pytest.mark.parametrize("axis, expected_mm", [(0, 0.8), (2, 2.5)])
def test_hd95_of_one_voxel_shift_is_the_spacing(axis, expected_mm):
    reference = box_mask((20, 20, 20), (5, 5, 5), (15, 15, 15))
    row = one(reference, np.roll(reference, 1, axis=axis), ANISOTROPIC)
    assert row["hd95_mm"] == pytest.approx(expected_mm, rel=1e-12)
    assert 0 < row["assd_mm"] < expected_mm


def test_identical_masks_score_perfectly():
    mask = ball((24, 24, 24), (12, 12, 12), 7)
    row = one(mask, mask, ANISOTROPIC, tolerance=0.0)
    assert row["dice"] == row["jaccard"] == row["surface_dice"] == 1.0
    assert row["assd_mm"] == row["hd95_mm"] == 0.0


def test_empty_masks_are_counted_and_a_miss_gets_the_penalty_distance():
    shape = (16, 16, 16)
    blob, nothing = box_mask(shape, (3, 3, 3), (8, 8, 8)), np.zeros(shape, bool)
    corner = box_mask(shape, (10, 10, 10), (12, 12, 12))
    reference = labels_of(blob, nothing, nothing, corner)
    prediction = labels_of(nothing, blob, nothing, corner)
    rows = score_case(reference, prediction, classes(5))
    missed, invented, absent, hit = rows
    assert missed["empty_prediction"] and not missed["empty_reference"]
    assert invented["empty_reference"] and not invented["empty_prediction"]
    diagonal_mm = np.sqrt(3 * 16.0 ** 2)  # the largest distance inside the 16^3 map
    for row in (missed, invented):
        assert row["dice"] == row["jaccard"] == row["surface_dice"] == 0.0
        assert row["assd_mm"] == row["hd95_mm"] == pytest.approx(diagonal_mm) and row["distance_penalised"]
    assert not hit["distance_penalised"] and not absent["distance_penalised"]
    spaced = score_case(reference, prediction, classes(5), spacing_mm=(1.0, 2.0, 0.5))[0]
    assert spaced["assd_mm"] == pytest.approx(np.sqrt(16.0 ** 2 + 32.0 ** 2 + 8.0 ** 2))
    assert missed["reference_mm3"] == 125.0 and missed["predicted_mm3"] == 0.0
    assert absent["empty_reference"] and absent["empty_prediction"]
    assert absent["dice"] == absent["jaccard"] == absent["surface_dice"] == 1.0
    assert absent["assd_mm"] == absent["hd95_mm"] == 0.0
    assert hit["dice"] == 1.0 and not hit["empty_reference"]
    empty = np.zeros(shape, np.int32)
    assert all(row["dice"] == 1.0 and row["empty_reference"] for row in score_case(empty, empty, classes(3)))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISOTROPIC])
def test_cropped_computation_equals_full_volume_brute_force(spacing):
    rng = np.random.default_rng(7)
    for _ in range(3):
        shape = tuple(rng.integers(18, 30, size=3))
        reference, prediction = random_labels(rng, shape, 4), random_labels(rng, shape, 4)
        for row in score_case(reference, prediction, classes(4), spacing, tolerance_mm=1.5):
            a, b = reference == row["class"], prediction == row["class"]
            if not (a.any() and b.any()):
                continue
            expected = brute_force(a, b, spacing, 1.5)
            for key, value in expected.items():
                assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_surface_distance_metrics_are_those_of_scipys_distances_between_the_surfaces():
    """ASSD, HD95 and surface Dice from one distance per surface voxel (mask XOR its erosion) to the other
    surface, scipy's EDT with the anisotropic spacing (the conventions of the module docstring): random maps,
    and a shifted box with a far island, where the pooled 95th percentile would hide the one-sided miss."""
    rng = np.random.default_rng(3)
    box = np.zeros((20, 17, 15), np.int32)
    box[3:12, 3:12, 2:8] = 1
    island = np.roll(box, 1, axis=0)
    island[15:19, 13:16, 10:14] = 1
    for reference, prediction in [(random_labels(rng, box.shape, 2), random_labels(rng, box.shape, 2)), (box, island)]:
        a, b = prediction == 1, reference == 1
        sa, sb = a ^ ndimage.binary_erosion(a), b ^ ndimage.binary_erosion(b)
        a_to_b = ndimage.distance_transform_edt(~sb, sampling=ANISOTROPIC)[sa]
        b_to_a = ndimage.distance_transform_edt(~sa, sampling=ANISOTROPIC)[sb]
        pooled = np.concatenate([a_to_b, b_to_a])
        row = score_case(reference, prediction, classes(2), ANISOTROPIC, tolerance_mm=1.5)[0]
        assert row["assd_mm"] == pytest.approx(pooled.mean(), rel=1e-12)
        hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
        assert row["hd95_mm"] == pytest.approx(hd95, rel=1e-12)
        assert row["surface_dice"] == pytest.approx(np.mean(pooled <= 1.5), rel=1e-12)
    assert hd95 > np.percentile(pooled, 95) + 1.0  # the island case tells the two conventions apart


def test_two_dimensional_label_maps():
    reference = np.zeros((12, 12), np.int32)
    reference[2:6, 2:6] = 1
    prediction = np.roll(reference, 1, axis=1)
    row = score_case(reference, prediction, classes(2), (0.5, 2.0))[0]
    assert row["dice"] == pytest.approx(0.75) and row["hd95_mm"] == pytest.approx(2.0)


@settings(max_examples=30, deadline=None)
@given(
    arrays(bool, (7, 6, 5)),
    arrays(bool, (7, 6, 5)),
    st.tuples(*[st.sampled_from([0.5, 1.0, 2.5])] * 3),
)
def test_metrics_are_symmetric_in_reference_and_prediction(a, b, spacing):
    forward, backward = one(a, b, spacing), one(b, a, spacing)
    for key in ("dice", "jaccard", "assd_mm", "hd95_mm", "surface_dice"):
        np.testing.assert_allclose(forward[key], backward[key], rtol=1e-12, err_msg=key)
    assert forward["empty_reference"] == backward["empty_prediction"]


def test_summarize_penalises_misses_and_leaves_out_classes_absent_from_both():
    rows = [
        {"class": 1, "dice": 0.5, "jaccard": 1 / 3, "assd_mm": 2.0, "hd95_mm": 4.0, "surface_dice": 0.5,
         "reference_mm3": 10.0, "predicted_mm3": 10.0, "empty_reference": False, "empty_prediction": False},
        {"class": 1, "dice": 0.0, "jaccard": 0.0, "assd_mm": 27.7, "hd95_mm": 27.7, "distance_penalised": True,
         "surface_dice": 0.0, "reference_mm3": 8.0, "predicted_mm3": 0.0, "empty_reference": False,
         "empty_prediction": True},
        {"class": 1, "dice": 1.0, "jaccard": 1.0, "assd_mm": 0.0, "hd95_mm": 0.0, "surface_dice": 1.0,
         "reference_mm3": 0.0, "predicted_mm3": 0.0, "empty_reference": True, "empty_prediction": True},
        {"class": 2, "dice": float("nan"), "jaccard": 0.9 / 1.1, "assd_mm": 1.0, "hd95_mm": 1.0, "surface_dice": 1.0,
         "reference_mm3": 5.0, "predicted_mm3": 5.0, "empty_reference": False, "empty_prediction": False},
        {"class": 2, "dice": 0.9, "jaccard": 0.9 / 1.1, "assd_mm": 1.0, "hd95_mm": 1.0, "surface_dice": 1.0,
         "reference_mm3": 5.0, "predicted_mm3": 5.0, "empty_reference": False, "empty_prediction": False},
    ]
    rows = [{**row, "class_name": "ab"[row["class"] - 1]} for row in rows]
    summary = summarize(rows[::-1])  # in the order of the structures' numbers, whatever the rows' order
    assert list(summary["classes"]) == ["a", "b"]
    a = summary["classes"]["a"]
    assert a["cases"] == 3 and a["both_empty"] == 1 and a["empty_prediction"] == 2 and a["empty_reference"] == 1
    assert a["distance_penalised"] == 1
    # the case without class a in either map is left out: it does not raise the mean to (0.5 + 0 + 1) / 3
    assert a["dice"] == {"mean": 0.25, "std": 0.25, "median": 0.25, "count": 2, "nan_count": 0}
    assert a["assd_mm"]["mean"] == pytest.approx((2.0 + 27.7) / 2) and a["assd_mm"]["count"] == 2  # a miss counts
    b = summary["classes"]["b"]
    assert b["dice"]["mean"] == 0.9 and b["dice"]["nan_count"] == 1
    assert summary["mean_dice"] == pytest.approx((0.25 + 0.9) / 2)
    only_absent = summarize(rows[2:3])
    assert only_absent["classes"]["a"]["both_empty"] == 1 and np.isnan(only_absent["mean_dice"])
    assert np.isnan(summarize([])["mean_dice"])


BRATS_REGIONS = Targets(5, ("background", "necrosis", "edema", "non_enhancing", "enhancing"), (
    Region("whole_tumour", (1, 2, 3, 4), 2), Region("tumour_core", (1, 3, 4), 1), Region("enhancing", (4,), 4)))


def line(*values):
    """A label map (N, 1, 1) int32 along x."""
    return np.array(values, np.int32).reshape(-1, 1, 1)


def test_regions_score_the_dice_of_their_label_sets():
    reference = line(0, 2, 2, 1, 1, 4, 4, 0)
    prediction = line(2, 2, 2, 1, 4, 4, 0, 0)
    rows = score_case(reference, prediction, BRATS_REGIONS)
    assert [(r["class"], r["class_name"]) for r in rows] == [(1, "whole_tumour"), (2, "tumour_core"), (3, "enhancing")]
    # whole tumour: 6 and 6 voxels, 5 shared; core: 4 and 3, 3 shared; enhancing: 2 and 2, 1 shared
    assert [r["dice"] for r in rows] == [10 / 12, 6 / 7, 2 / 4]
    assert [r["jaccard"] for r in rows] == [5 / 7, 3 / 4, 1 / 3]
    assert [(r["reference_mm3"], r["predicted_mm3"]) for r in rows] == [(6, 6), (4, 3), (2, 2)]
    summary = summarize(rows)
    assert list(summary["classes"]) == ["whole_tumour", "tumour_core", "enhancing"]
    assert summary["mean_dice"] == pytest.approx((10 / 12 + 6 / 7 + 2 / 4) / 3, rel=1e-15)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISOTROPIC])
def test_region_metrics_equal_full_volume_brute_force_of_their_masks(spacing):
    """Each region's box is the union of its labels' boxes: every metric equals the full-volume one of isin masks."""
    rng = np.random.default_rng(11)
    for _ in range(3):
        shape = tuple(rng.integers(18, 30, size=3))
        reference, prediction = random_labels(rng, shape, 5), random_labels(rng, shape, 5)
        for row, (_, values) in zip(score_case(reference, prediction, BRATS_REGIONS, spacing, 1.5),
                                    BRATS_REGIONS.structures):
            a, b = np.isin(reference, values), np.isin(prediction, values)
            assert a.any() and b.any()
            for key, value in brute_force(a, b, spacing, 1.5).items():
                assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_the_ignore_label_counts_in_no_true_false_positive_or_negative():
    """nnU-Net's rule: a voxel whose reference is the ignore label (9) is dropped from the prediction."""
    reference = line(0, 1, 1, 1, 9, 9, 9, 0)
    rows = score_case(reference, line(0, 1, 1, 1, 1, 1, 0, 0), classes(2, ignore_label=9))
    row = rows[0]  # right, and foreground in the ignored area: a perfect score
    assert row["dice"] == row["jaccard"] == row["surface_dice"] == 1.0 and row["predicted_mm3"] == 3.0
    assert row["assd_mm"] == row["hd95_mm"] == 0.0
    row = score_case(reference, line(0, 0, 1, 1, 1, 0, 1, 1), classes(2, ignore_label=9))[0]
    assert row["dice"] == 2 * 2 / (2 * 2 + 1 + 1)  # TP 2 (x = 2, 3), FP 1 (x = 7), FN 1 (x = 1); x = 4, 6 left out
    assert row["jaccard"] == 2 / 4 and row["predicted_mm3"] == 3.0
    nothing_else = score_case(line(0, 9, 9, 0), line(0, 1, 1, 0), classes(2, ignore_label=9))[0]
    assert nothing_else["dice"] == 1.0 and nothing_else["empty_prediction"] and not nothing_else["distance_penalised"]


def test_the_ignore_label_leaves_the_surface_metrics_as_nnunet_leaves_the_overlap():
    """A cube next to an ignored slab, predicted as the cube grown into the slab: only the part outside counts,
    for the surfaces too; the Dice of random maps is nnU-Net's (TP, FP, FN counted where the reference is not
    ignored), with regions as with labels."""
    reference = np.zeros((12, 12, 12), np.uint8)
    reference[3:7, 3:9, 3:9] = 1
    reference[7:10] = 255
    prediction = reference.copy()
    prediction[7:10, 3:9, 3:9] = 1
    row = score_case(reference, np.where(prediction == 255, 0, prediction), classes(2, ignore_label=255),
                     ANISOTROPIC, 0.0)[0]
    assert (row["dice"], row["assd_mm"], row["hd95_mm"], row["surface_dice"]) == (1.0, 0.0, 0.0, 1.0)
    rng = np.random.default_rng(5)
    for targets in (classes(5, ignore_label=7), dataclasses.replace(BRATS_REGIONS, ignore_label=7)):
        reference, prediction = random_labels(rng, (20, 22, 18), 5), random_labels(rng, (20, 22, 18), 5)
        reference[random_labels(rng, (20, 22, 18), 2) == 1] = 7
        kept = reference != 7
        for row, (_, values) in zip(score_case(reference, prediction, targets), targets.structures):
            a, b = np.isin(reference, values), np.isin(prediction, values)
            tp, fp, fn = np.sum(a & b & kept), np.sum(~a & b & kept), np.sum(a & ~b & kept)
            assert row["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-15)
            for key, value in brute_force(a, b & kept, (1.0, 1.0, 1.0), 1.0).items():
                assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_bad_inputs_raise_with_the_facts():
    good = np.zeros((4, 5, 6), np.int32)
    with pytest.raises(ValueError, match=r"\(4, 5, 6\).*\(4, 5, 7\)"):
        score_case(good, np.zeros((4, 5, 7), np.int32), classes(2))
    with pytest.raises(ScoringInputError, match="float32.*np.rint"):
        score_case(good, good.astype(np.float32), classes(2))
    out_of_range = good.copy()
    out_of_range[1, 1, 1] = 5
    with pytest.raises(DataError, match="prediction holds label 5, outside 0 .. 2; set data.num_classes"):
        score_case(good, out_of_range, classes(3))
    with pytest.raises(DataError, match="reference holds label 5, outside 0 .. 2 and is not data.ignore_label 4"):
        score_case(out_of_range, good, classes(3, ignore_label=4))
    ignored = good.copy()
    ignored[2, 2, 2] = 4
    score_case(ignored, good, classes(3, ignore_label=4))  # the reference may hold the ignore label ...
    with pytest.raises(DataError, match="prediction holds label 4, outside 0 .. 2; set"):
        score_case(good, ignored, classes(3, ignore_label=4))  # ... the prediction may not
    with pytest.raises(ScoringInputError, match="spacing_mm"):
        score_case(good, good, classes(2), spacing_mm=(1.0, 0.0, 1.0))
    with pytest.raises(ScoringInputError, match="targets must be a medseg_dl.data.targets.Targets.*got 2$"):
        score_case(good, good, 2)


