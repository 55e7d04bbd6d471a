"""Losses against a numpy reference, deep supervision, and the streaming Dice metric
(its sum over replicas is tested in test_model_fn.py)."""
import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.model.losses import cross_entropy_loss, deep_supervision_loss, make_loss
from medseg_dl.model.metrics import StreamingDice

K = 3


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
    np.testing.assert_allclose(float(deep_supervision_loss(cross_entropy_loss, labels, [logits])),
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
    np.testing.assert_allclose(float(deep_supervision_loss(cross_entropy_loss, labels, [logits, coarse, coarser],
                                                           strides)), expected_ce, rtol=1e-5)
    with pytest.raises(ValueError, match="level strides"):
        deep_supervision_loss(cross_entropy_loss, labels, [logits, coarse, coarser], strides[:2])


def _numpy_dice(labels, predictions):
    dice = []
    for k in range(K):
        tp = np.sum((labels == k) & (predictions == k))
        denominator = np.sum(labels == k) + np.sum(predictions == k)
        dice.append(2 * tp / denominator if denominator else np.nan)
    return np.array(dice)


def test_streaming_dice_equals_dice_of_the_concatenated_batches():
    metric = StreamingDice(K, ["bg", "a", "b"])
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
    metric = StreamingDice(K)
    labels = np.array([[[[0, 1], [1, 0]]]], np.int32)
    metric.update_state(labels, labels)
    result = metric.result().numpy()
    np.testing.assert_array_equal(result[:2], [1.0, 1.0])
    assert np.isnan(result[2])
    assert float(metric.mean_foreground()) == 1.0
    assert metric.class_names == ["class_0", "class_1", "class_2"]
