"""Losses against a numpy reference (labels and regions, with and without the ignore label), deep
supervision, exact zero gradients at ignored voxels, and the streaming Dice metric (its sum over replicas
is tested in test_model_fn.py)."""
import functools
import json

import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.data.targets import Targets
from medseg_dl.model.losses import cross_entropy_loss, deep_supervision_loss, make_loss
from medseg_dl.model.metrics import StreamingDice

K = 3
IGNORE = 3  # the ignore label of LABELS_DATA and REGIONS_DATA
LABELS_DATA = {"num_classes": K, "ignore_label": IGNORE}
REGIONS_DATA = {"num_classes": K, "ignore_label": IGNORE,
                "regions": [{"name": "outer", "labels": [1, 2], "paint": 1},
                            {"name": "inner", "labels": [2], "paint": 2}]}
LABELS = Targets(K, ("bg", "a", "b"))
REGIONS = Targets.from_params(Params.from_dict({"data": REGIONS_DATA}).data)
label_ce = functools.partial(cross_entropy_loss, LABELS)


def _random_case(seed, shape=(2, 5, 6, 4)):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, size=shape).astype(np.int32)
    logits = rng.normal(scale=2.0, size=shape + (K,)).astype(np.float32)
    return labels, logits


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _numpy_overlap_loss(labels, logits, kind, smooth, squared, batch, include_background):
    p = _softmax(logits.astype(np.float64))
    g = np.eye(K)[labels]
    axes = (0, 1, 2, 3) if batch else (1, 2, 3)
    inter = (p * g).sum(axes)
    p_sum = (p ** 2 if squared else p).sum(axes)
    g_sum = g.sum(axes)
    if kind == "dice":
        score = (2 * inter + smooth) / (p_sum + g_sum + smooth)
    else:
        score = (inter + smooth) / (p_sum + g_sum - inter + smooth)
    score = score[..., 0 if include_background else 1:]
    return 1.0 - score.mean()


def _numpy_ce(labels, logits):
    p = _softmax(logits.astype(np.float64))
    return -np.log(np.take_along_axis(p, labels[..., None], axis=-1)).mean()


def _params(**loss):
    return Params.from_dict({"loss": loss, "data": {"num_classes": K}})


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
@pytest.mark.parametrize("squared, batch, include_background",
                         [(False, True, False), (True, True, False), (False, False, True), (True, False, True)])
def test_overlap_losses_match_numpy(kind, squared, batch, include_background):
    labels, logits = _random_case(1)
    options = dict(smooth=0.5, squared_denominator=squared, batch_dice=batch, include_background=include_background)
    loss = make_loss(_params(name=kind, **options))(labels, logits)
    assert loss.dtype == tf.float32
    expected = _numpy_overlap_loss(labels, logits, kind, 0.5, squared, batch, include_background)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dice", "jaccard"])
def test_combined_losses_add_weighted_cross_entropy(kind):
    labels, logits = _random_case(2)
    loss = make_loss(_params(name=f"{kind}_ce", ce_weight=0.3))(labels, logits)
    expected = _numpy_overlap_loss(labels, logits, kind, 1e-5, False, True, False) + 0.3 * _numpy_ce(labels, logits)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(make_loss(_params(name="ce"))(labels, logits)), _numpy_ce(labels, logits),
                               rtol=1e-5)


@pytest.mark.parametrize("name", ["dice", "jaccard", "dice_ce", "jaccard_ce", "ce"])
def test_perfect_prediction_gives_zero_and_disjoint_masks_give_one(name):
    labels, _ = _random_case(3)
    loss_fn = make_loss(_params(name=name))
    perfect = 30.0 * np.eye(K, dtype=np.float32)[labels]
    assert float(loss_fn(labels, perfect)) < 1e-4
    if name != "ce":
        disjoint = 30.0 * np.eye(K, dtype=np.float32)[(labels + 1) % K]
        assert float(loss_fn(labels, disjoint)) > 0.99


@pytest.mark.parametrize("batch", [True, False])
def test_gradients_are_finite_when_a_class_is_absent(batch):
    labels, logits = _random_case(4)
    labels = np.where(labels == 2, 0, labels)  # class 2 absent from every sample
    labels[0] = 0  # sample 0 has background only
    logits = tf.Variable(logits)
    for name in ("dice", "jaccard"):
        with tf.GradientTape() as tape:
            loss = make_loss(_params(name=name, batch_dice=batch, squared_denominator=True))(labels, logits)
        grad = tape.gradient(loss, logits).numpy()
        assert np.isfinite(float(loss)) and np.isfinite(grad).all() and np.abs(grad).max() > 0


def test_deep_supervision_weights_levels_and_subsamples_labels():
    labels, logits = _random_case(5, shape=(2, 7, 6, 5))
    coarse = np.random.default_rng(6).normal(size=(2, 4, 3, 3, K)).astype(np.float32)
    coarser = np.random.default_rng(7).normal(size=(2, 2, 2, 2, K)).astype(np.float32)
    loss_fn = make_loss(_params(name="ce"))
    expected = (_numpy_ce(labels, logits) + 0.5 * _numpy_ce(labels[:, ::2, ::2, ::2], coarse)
                + 0.25 * _numpy_ce(labels[:, ::4, ::4, ::4], coarser)) / 1.75
    np.testing.assert_allclose(float(loss_fn(labels, [logits, coarse, coarser])), expected, rtol=1e-5)
    np.testing.assert_allclose(float(deep_supervision_loss(label_ce, labels, [logits])),
                               _numpy_ce(labels, logits), rtol=1e-5)


def test_deep_supervision_with_per_axis_level_strides():
    """Anisotropic U-Net levels: cumulative strides (1, 1, 1), (2, 2, 1), (4, 4, 2) from model.strides."""
    labels, logits = _random_case(11, shape=(2, 7, 6, 5))
    coarse = np.random.default_rng(12).normal(size=(2, 4, 3, 5, K)).astype(np.float32)
    coarser = np.random.default_rng(13).normal(size=(2, 2, 2, 3, K)).astype(np.float32)
    params = Params.from_dict({"loss": {"name": "dice_ce", "ce_weight": 0.5, "smooth": 1.0},
                               "data": {"num_classes": K},
                               "model": {"depth": 3, "strides": [[2, 2, 1], [2, 2, 2]]}})

    def reference(lab, log):
        return _numpy_overlap_loss(lab, log, "dice", 1.0, False, True, False) + 0.5 * _numpy_ce(lab, log)
    expected = (reference(labels, logits) + 0.5 * reference(labels[:, ::2, ::2, ::1], coarse)
                + 0.25 * reference(labels[:, ::4, ::4, ::2], coarser)) / 1.75
    np.testing.assert_allclose(float(make_loss(params)(labels, [logits, coarse, coarser])), expected, rtol=1e-5)
    strides = [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    expected_ce = (_numpy_ce(labels, logits) + 0.5 * _numpy_ce(labels[:, ::2, ::2, :], coarse)
                   + 0.25 * _numpy_ce(labels[:, ::4, ::4, ::2], coarser)) / 1.75
    np.testing.assert_allclose(float(deep_supervision_loss(label_ce, labels, [logits, coarse, coarser],
                                                           strides)), expected_ce, rtol=1e-5)
    with pytest.raises(ValueError, match="level strides"):
        deep_supervision_loss(label_ce, labels, [logits, coarse, coarser], strides[:2])


def _numpy_dice(labels, predictions):
    dice = []
    for k in range(K):
        tp = np.sum((labels == k) & (predictions == k))
        denominator = np.sum(labels == k) + np.sum(predictions == k)
        dice.append(2 * tp / denominator if denominator else np.nan)
    return np.array(dice)


def test_streaming_dice_equals_dice_of_the_concatenated_batches():
    metric = StreamingDice(LABELS)
    batches = [_random_case(seed) for seed in (8, 9, 10)]
    update = tf.function(metric.update_state)
    for labels, logits in batches:
        update(labels, logits)
    all_labels = np.concatenate([labels for labels, _ in batches])
    all_predictions = np.concatenate([logits.argmax(-1) for _, logits in batches])
    expected = _numpy_dice(all_labels, all_predictions)
    np.testing.assert_allclose(metric.result(), expected, rtol=1e-6)
    np.testing.assert_allclose(float(metric.mean_foreground()), expected[1:].mean(), rtol=1e-6)
    metric.reset_state()
    metric.update_state(all_labels, all_predictions.astype(np.int32))  # class indices work too
    np.testing.assert_allclose(metric.result(), expected, rtol=1e-6)


def test_streaming_dice_of_a_class_absent_everywhere_is_nan_and_skipped():
    metric = StreamingDice(LABELS)
    labels = np.array([[[[0, 1], [1, 0]]]], np.int32)
    metric.update_state(labels, labels)
    result = metric.result().numpy()
    np.testing.assert_array_equal(result[:2], [1.0, 1.0])
    assert np.isnan(result[2])
    assert float(metric.mean_foreground()) == 1.0
    assert metric.output_names == ["bg", "a", "b"]



def _case_with_ignored(seed, outputs, shape=(2, 5, 6, 4)):
    """Labels 0..3 (3 ignored, about a quarter of the voxels) and logits (..., outputs)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K + 1, size=shape).astype(np.int32)
    return labels, rng.normal(scale=2.0, size=shape + (outputs,)).astype(np.float32)


def _outputs(data):
    return 2 if "regions" in data else K


def _targets_params(data, model=None, **loss):
    return Params.from_dict({"loss": loss, "data": data, "model": model or {}})


def _numpy_loss(targets, labels, logits, name, smooth=1e-5, squared=False, batch=True, include_background=False,
                ce_weight=1.0):
    """The losses of the module docstring in float64: every sum weighted by the valid mask v."""
    logits = logits.astype(np.float64)
    g = targets.membership()[labels].astype(np.float64)
    v = targets.valid()[labels].astype(np.float64)[..., None]
    if targets.uses_regions:
        p = 1.0 / (1.0 + np.exp(-logits))
        voxel_ce = -(g * np.log(p) + (1 - g) * np.log(1 - p)).mean(-1)
    else:
        p = _softmax(logits)
        voxel_ce = -(g * np.log(p)).sum(-1)
    ce = (voxel_ce * v[..., 0]).sum() / max(v.sum(), 1.0)
    if name == "ce":
        return ce
    axes = (0, 1, 2, 3) if batch else (1, 2, 3)
    inter, p_sum, g_sum = (v * p * g).sum(axes), (v * p ** (2 if squared else 1)).sum(axes), (v * g).sum(axes)
    if name.startswith("dice"):
        score = (2 * inter + smooth) / (p_sum + g_sum + smooth)
    else:
        score = (inter + smooth) / (p_sum + g_sum - inter + smooth)
    if not (targets.uses_regions or include_background):
        score = score[..., 1:]
    return 1.0 - score.mean() + (ce_weight * ce if name.endswith("_ce") else 0.0)


@pytest.mark.parametrize("data", [LABELS_DATA, REGIONS_DATA], ids=["labels", "regions"])
@pytest.mark.parametrize("name", ["dice", "jaccard", "dice_ce", "jaccard_ce", "ce"])
@pytest.mark.parametrize("squared, batch, include_background", [(False, True, False), (True, False, True)])
def test_losses_with_ignored_voxels_and_regions_match_numpy(data, name, squared, batch, include_background):
    labels, logits = _case_with_ignored(20, _outputs(data))
    options = dict(smooth=0.5, squared_denominator=squared, batch_dice=batch, include_background=include_background,
                   ce_weight=0.3)
    loss = make_loss(_targets_params(data, name=name, **options))(labels, logits)
    targets = Targets.from_params(Params.from_dict({"data": data}).data)
    expected = _numpy_loss(targets, labels, logits, name, 0.5, squared, batch, include_background, 0.3)
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_region_losses_count_every_region_and_ignore_include_background():
    labels, logits = _case_with_ignored(21, 2)
    for name in ("dice", "jaccard_ce"):
        losses = [float(make_loss(_targets_params(REGIONS_DATA, name=name, include_background=flag))(labels, logits))
                  for flag in (False, True)]
        assert losses[0] == losses[1]
        np.testing.assert_allclose(losses[0], _numpy_loss(REGIONS, labels, logits, name), rtol=1e-5)


def _flat(labels, logits):
    """(n,) labels and (n, K) logits as one sample of n x 1 x 1 voxels."""
    return labels.reshape(1, -1, 1, 1), logits.reshape(1, -1, 1, 1, logits.shape[-1])


@pytest.mark.parametrize("data", [LABELS_DATA, REGIONS_DATA], ids=["labels", "regions"])
@pytest.mark.parametrize("name", ["dice", "jaccard", "dice_ce", "jaccard_ce", "ce"])
def test_an_ignored_voxel_counts_as_if_it_were_not_there(data, name):
    """batch_dice: the loss equals that of the kept voxels alone, as one flat sample; per-sample Dice: the mean
    of the losses of each sample's kept voxels."""
    labels, logits = _case_with_ignored(22, _outputs(data))
    kept = labels != IGNORE
    batch_loss = make_loss(_targets_params(data, name=name, smooth=0.5))
    np.testing.assert_allclose(float(batch_loss(labels, logits)), float(batch_loss(*_flat(labels[kept], logits[kept]))),
                               rtol=1e-6)
    if name in ("dice", "jaccard"):
        sample_loss = make_loss(_targets_params(data, name=name, smooth=0.5, batch_dice=False))
        per_sample = [float(sample_loss(*_flat(lab[keep], log[keep]))) for lab, log, keep in zip(labels, logits, kept)]
        np.testing.assert_allclose(float(sample_loss(labels, logits)), np.mean(per_sample), rtol=1e-6)


def _gradients(loss_fn, labels, logits):
    variables = [tf.Variable(level) for level in logits]
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, variables if len(variables) > 1 else variables[0])
    return loss, [g.numpy() for g in tape.gradient(loss, variables)]


@pytest.mark.parametrize("data", [LABELS_DATA, REGIONS_DATA], ids=["labels", "regions"])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_the_gradient_at_ignored_voxels_is_exactly_zero(data, deep_supervision):
    labels, logits = _case_with_ignored(23, _outputs(data), shape=(2, 8, 8, 8))
    levels = [logits]
    if deep_supervision:
        rng = np.random.default_rng(24)
        levels += [rng.normal(size=(2, n, n, n, logits.shape[-1])).astype(np.float32) for n in (4, 2)]
    loss_fn = make_loss(_targets_params(data, {"depth": 3}, name="dice_ce", squared_denominator=True))
    loss, gradients = _gradients(loss_fn, labels, levels)
    assert np.isfinite(float(loss))
    for level, gradient in enumerate(gradients):
        ignored = labels[:, ::2 ** level, ::2 ** level, ::2 ** level] == IGNORE
        assert ignored.any() and (~ignored).any()
        assert (gradient[ignored] == 0.0).all()
        assert (gradient[~ignored] != 0.0).all()


@pytest.mark.parametrize("data", [LABELS_DATA, REGIONS_DATA], ids=["labels", "regions"])
def test_a_batch_of_ignored_voxels_only_gives_zero_loss_and_gradient(data):
    _, logits = _case_with_ignored(25, _outputs(data))
    labels = np.full(logits.shape[:-1], IGNORE, np.uint8)
    loss, (gradient,) = _gradients(make_loss(_targets_params(data, name="dice_ce")), labels, [logits])
    assert float(loss) == 0.0 and (gradient == 0.0).all()


def test_logits_with_other_channels_than_the_targets_are_refused():
    labels, logits = _case_with_ignored(26, K)
    with pytest.raises(ValueError, match="logits have 3 channels; the targets have 2 outputs"):
        make_loss(_targets_params(REGIONS_DATA, name="dice"))(labels, logits)


def _counts(metric):
    return [metric.true_positives.numpy().tolist(), metric.false_positives.numpy().tolist(),
            metric.false_negatives.numpy().tolist()]


def test_streaming_dice_of_labels_leaves_out_the_ignored_voxels():
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 3, 3], np.uint8).reshape(1, 9, 1, 1)
    logits = 5.0 * np.eye(K, dtype=np.float32)[[0, 1, 1, 1, 2, 2, 1, 2, 0]].reshape(1, 9, 1, 1, K)
    metric = StreamingDice(Targets.from_params(Params.from_dict({"data": LABELS_DATA}).data))
    metric.update_state(labels, logits)
    assert _counts(metric) == [[1, 2, 1], [0, 1, 1], [1, 1, 0]]  # TP, FP, FN per class
    np.testing.assert_allclose(metric.result(), [2 / 3, 4 / 6, 2 / 3], rtol=1e-6)
    without_ignore = StreamingDice(LABELS)
    without_ignore.update_state(np.where(labels == IGNORE, 0, labels), logits)
    assert _counts(without_ignore) == [[2, 2, 1], [0, 2, 2], [3, 1, 0]]


def test_streaming_dice_of_regions_counts_each_region_of_the_valid_voxels():
    labels = np.array([0, 1, 2, 2, 1, 0, 3, 3], np.uint8).reshape(1, 2, 2, 2)
    outer = [1, 1, 1, -1, -1, -1, 1, -1]
    inner = [-1, 1, 1, -1, 1, 1, 1, -1]
    logits = np.stack([outer, inner], -1).astype(np.float32).reshape(1, 2, 2, 2, 2)
    metric = StreamingDice(REGIONS)
    tf.function(metric.update_state)(labels, logits)
    assert _counts(metric) == [[2, 1], [1, 3], [2, 1]]  # TP, FP, FN per region
    np.testing.assert_allclose(metric.result(), [4 / 7, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(float(metric.mean_foreground()), (4 / 7 + 1 / 3) / 2, rtol=1e-6)  # no background
    assert metric.output_names == ["outer", "inner"]
    with pytest.raises(ValueError, match="regions need logits"):
        metric.update_state(labels, labels)


def test_streaming_dice_config_round_trips_through_json():
    metric = StreamingDice(REGIONS, name="region_dice")
    config = json.loads(json.dumps(metric.get_config()))
    clone = StreamingDice.from_config(config)
    assert clone.targets == REGIONS and clone.name == "region_dice" and clone.get_config() == metric.get_config()
    with pytest.raises(ValueError, match="targets = 3"):
        StreamingDice(3)
