"""The post-processing decision (evaluation/postprocessing.py `decide`) on synthetic cross-validation cases, with
labels and with regions, and its application (inference/postprocess.py `apply`) on hand-made label maps."""
import functools
import json

import numpy as np
import pytest

from medseg_dl.data.targets import Region, Targets
from medseg_dl.errors import DataError
from medseg_dl.evaluation import postprocessing, scoring
from medseg_dl.inference import postprocess

SHAPE, SPACING = (32, 32, 24), (1.0, 1.0, 1.5)
LABELS = Targets(3, ("background", "ball", "box"))
REGIONS = Targets(4, ("background", "necrosis", "edema", "enhancing"), (
    Region("whole", (1, 2, 3), 2), Region("core", (1, 3), 1), Region("enhancing", (3,), 3)))


def ball(centre, radius_vox):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    return np.linalg.norm(grid - np.asarray(centre), axis=-1) < radius_vox


def structure(shift):
    """Reference labels (X, Y, Z) int32: a ball of class 1 and, touching it, a box of class 2 (one
    foreground component), moved by `shift` voxels along x."""
    labels = np.zeros(SHAPE, np.int32)
    labels[ball((12 + shift, 14, 12), 6)] = 1
    labels[18 + shift:24 + shift, 10:18, 8:16] = 2
    return labels


def with_islands(labels, corners, value):
    """A copy of `labels` with a 2 x 2 x 2 island of class `value` at each corner (x, y, z)."""
    out = labels.copy()
    for x, y, z in corners:
        out[x:x + 2, y:y + 2, z:z + 2] = value
    return out


def imperfect(labels):
    """The labels shifted by one voxel along y: every class keeps one component, Dice below 1."""
    return np.roll(labels, 1, axis=1)


def test_small_spurious_islands_turn_post_processing_on_and_raise_the_mean_dice():
    cases = []
    for shift in (0, 2, 4):
        reference = structure(shift)
        prediction = with_islands(imperfect(reference), [(1, 28, 1), (28, 1, 20)], 1)
        prediction = with_islands(prediction, [(1, 1, 1), (29, 29, 20)], 2)
        cases.append((reference, prediction, SPACING))
    decision = postprocessing.decide(cases, LABELS)
    assert decision["foreground_largest_component"] or set(decision["min_island_mm3"]) == {"1", "2"}
    assert np.mean(decision["dice_after"]) > np.mean(decision["dice_before"]) + 0.01
    np.testing.assert_allclose(decision["dice_after"], postprocessing.mean_dice(cases, decision, LABELS))
    np.testing.assert_allclose(decision["dice_before"], postprocessing.mean_dice(cases, postprocess.NOTHING, LABELS))
    for reference, prediction, spacing in cases:  # the islands are gone, the structure is intact
        np.testing.assert_array_equal(postprocess.apply(prediction, decision, spacing, LABELS), imperfect(reference))
    assert decision["cases"] == 3 and json.loads(json.dumps(decision)) == decision


def test_predictions_of_one_component_per_class_turn_every_step_off():
    """The hippocampus case: anterior and posterior touch, each predicted as one component."""
    cases = [(structure(shift), imperfect(structure(shift)), SPACING) for shift in (0, 3)]
    decision = postprocessing.decide(cases, LABELS)
    assert {k: decision[k] for k in postprocess.NOTHING} == postprocess.NOTHING
    assert decision["dice_after"] == decision["dice_before"] and np.mean(decision["dice_before"]) < 0.99


def test_largest_component_stays_off_when_a_class_has_two_true_structures():
    """Class 1 is a large and a smaller ball (two true components, like left and right): keeping the largest
    component of the foreground or of class 1 deletes the smaller one, so both stay off; the islands of class 1
    still go (their threshold is half the smaller ball), and the island of class 2 with its largest component."""
    cases = []
    for shift in (0, 2):
        reference = structure(shift)
        reference[ball((8 + shift, 26, 12), 4)] = 1
        prediction = with_islands(imperfect(reference), [(28, 2, 2), (28, 2, 20)], 1)
        cases.append((reference, with_islands(prediction, [(28, 28, 20)], 2), SPACING))
    decision = postprocessing.decide(cases, LABELS)
    assert not decision["foreground_largest_component"] and decision["largest_component_classes"] == [2]
    assert set(decision["min_island_mm3"]) == {"1"}
    assert np.mean(decision["dice_after"]) > np.mean(decision["dice_before"])
    for reference, prediction, spacing in cases:
        np.testing.assert_array_equal(postprocess.apply(prediction, decision, spacing, LABELS), imperfect(reference))
    reference, prediction, spacing = cases[0]
    lcc = postprocess.apply(prediction, {**postprocess.NOTHING, "largest_component_classes": [1]}, spacing, LABELS)
    assert (lcc == 1).sum() < 0.8 * (imperfect(reference) == 1).sum()  # what the refused step would have done


def tumours(shift):
    """Reference labels (X, Y, Z) int32 of REGIONS: tumour A (edema around an enhancing shell around necrosis) and,
    apart from it, tumour B (edema only): two true components of the whole tumour, moved by `shift` along x."""
    labels = np.zeros(SHAPE, np.int32)
    labels[ball((10 + shift, 10, 12), 7)] = 2
    labels[ball((10 + shift, 10, 12), 4)] = 3
    labels[ball((10 + shift, 10, 12), 2)] = 1
    labels[ball((12 + shift, 25, 12), 4)] = 2
    return labels


def test_regions_decide_on_region_masks_and_keep_only_the_steps_that_help():
    """A necrosis island in the background: keeping the largest component of the foreground or of the whole
    tumour (structure 1) would delete tumour B, so both stay off; the largest component of the tumour core
    (structure 2) takes the island out of the core (raising its Dice; the island leaves it as edema, whole tumour
    only), then the whole tumour's islands go (raising its Dice); the enhancing tumour is untouched."""
    cases = []
    for shift in (0, 3):
        reference = tumours(shift)
        cases.append((reference, with_islands(imperfect(reference), [(28, 2, 2)], 1), SPACING))
    decision = postprocessing.decide(cases, REGIONS)
    assert not decision["foreground_largest_component"] and decision["largest_component_classes"] == [2]
    tumour_b_mm3 = np.count_nonzero(ball((12, 25, 12), 4)) * np.prod(SPACING)  # the smallest whole tumour
    assert decision["min_island_mm3"] == {"1": tumour_b_mm3 / 2}
    before, after = decision["dice_before"], decision["dice_after"]
    assert after[0] > before[0] and after[1] > before[1] + 0.01 and after[2] == before[2]
    for reference, prediction, spacing in cases:
        np.testing.assert_array_equal(postprocess.apply(prediction, decision, spacing, REGIONS), imperfect(reference))
    rows = [row for reference, prediction, spacing in cases for row in scoring.score_case(
        reference, postprocess.apply(prediction, decision, spacing, REGIONS), REGIONS, spacing)]
    summary = scoring.summarize(rows)  # the report's Dice after post-processing is the decision's
    assert [summary["classes"][name]["dice"]["mean"] for name in ("whole", "core", "enhancing")] == after
    assert json.loads(json.dumps(decision)) == decision


def test_the_decision_dice_leaves_out_the_ignore_label():
    """Foreground predicted in the ignored area (value 9) costs nothing; elsewhere it is a false positive."""
    targets = Targets(2, ("background", "organ"), ignore_label=9)
    reference = np.zeros((6, 1, 1), np.uint8)
    reference[1:3], reference[3:5] = 1, 9
    inside, outside = reference.copy(), reference.copy()
    inside[3:5], outside[3:6] = 1, 1
    assert postprocessing.mean_dice([(reference, inside, (1, 1, 1))], postprocess.NOTHING, targets) == [1.0]
    assert postprocessing.mean_dice([(reference, outside, (1, 1, 1))], postprocess.NOTHING, targets) == [4 / 5]


def line(*values):
    """A label map (N, 1, 1) int16 along x."""
    return np.array(values, np.int16).reshape(-1, 1, 1)


def test_apply_on_hand_made_label_maps():
    labels = line(1, 1, 1, 0, 1, 0, 2, 2, 0, 2)
    before = labels.copy()
    apply = functools.partial(postprocess.apply, targets=LABELS)
    steps = postprocess.NOTHING
    np.testing.assert_array_equal(apply(labels, steps, (1, 1, 1)), labels)
    np.testing.assert_array_equal(apply(labels, {**steps, "foreground_largest_component": True}, (1, 1, 1)),
                                  line(1, 1, 1, 0, 0, 0, 0, 0, 0, 0))
    np.testing.assert_array_equal(apply(labels, {**steps, "largest_component_classes": [2]}, (1, 1, 1)),
                                  line(1, 1, 1, 0, 1, 0, 2, 2, 0, 0))
    islands = {**steps, "min_island_mm3": {"1": 2.0}}  # 2 voxels at 1 mm^3, 1 voxel at 2 mm^3
    np.testing.assert_array_equal(apply(labels, islands, (1, 1, 1)), line(1, 1, 1, 0, 0, 0, 2, 2, 0, 2))
    np.testing.assert_array_equal(apply(labels, islands, (2, 1, 1)), labels)
    np.testing.assert_array_equal(apply(labels, {**steps, "min_island_mm3": {"2": 3.0}}, (1, 1, 1)),
                                  line(1, 1, 1, 0, 1, 0, 0, 0, 0, 0))
    everything = {"foreground_largest_component": False, "largest_component_classes": [1],
                  "min_island_mm3": {"2": 1.5}}
    result = apply(labels, everything, (1, 1, 1))
    np.testing.assert_array_equal(result, line(1, 1, 1, 0, 0, 0, 2, 2, 0, 0))
    assert result.dtype == np.int16
    np.testing.assert_array_equal(labels, before)  # the input is unchanged


def test_apply_connects_26_neighbours():
    """Two voxels that touch only at a corner are one component: keeping the largest keeps both."""
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = 1
    labels[3, 3, 0] = 1  # adjacent to neither: removed
    expected = labels.copy()
    expected[3, 3, 0] = 0
    np.testing.assert_array_equal(postprocess.apply(labels, {**postprocess.NOTHING, "largest_component_classes": [1]},
                                                    (1, 1, 1), LABELS), expected)


def test_the_decision_file_is_read_or_named_when_it_is_not_one(tmp_path):
    path = str(tmp_path / "postprocessing.json")
    assert postprocess.read_decision(path) is None and postprocess.read_decision(None) is None
    decision = {**postprocess.NOTHING, "min_island_mm3": {"1": 12.5}, "dice_before": [0.5, None]}
    (tmp_path / "postprocessing.json").write_text(json.dumps(decision))
    assert postprocess.read_decision(path) == decision
    (tmp_path / "postprocessing.json").write_text(json.dumps({"largest_component_classes": [1]}))
    with pytest.raises(DataError, match="postprocessing.json: not a post-processing decision"):
        postprocess.read_decision(path)
