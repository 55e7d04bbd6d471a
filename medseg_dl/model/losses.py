"""Segmentation losses on labels (N, X, Y, Z) int and logits (N, X, Y, Z, K), in float32.

Soft overlap of softmax probabilities p and one-hot labels g, per class k, summed over the
voxels of the whole (global: all replicas') batch (batch_dice) or of each sample:
    Dice_k    = (2 sum p g + smooth) / (sum p + sum g + smooth)
    Jaccard_k = (sum p g + smooth) / (sum p + sum g - sum p g + smooth)
With squared_denominator, p and g are squared in the denominators. The loss is 1 - the mean
over classes (and samples), background excluded unless include_background; the combined
losses add ce_weight * the mean voxel cross-entropy.
"""
import functools

import tensorflow as tf

from medseg_dl.model.layers import cumulative_strides, triple


def _probabilities_and_onehot(labels, logits):
    logits = tf.cast(logits, tf.float32)
    onehot = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(logits)[-1], dtype=tf.float32)
    return tf.nn.softmax(logits, axis=-1), onehot


def _overlap_sums(labels, logits, squared_denominator, batch_dice):
    """Intersection and the two denominator sums, shape (K,) if batch_dice else (N, K). With batch_dice
    under a distribution strategy the sums are those of the global batch (summed over all replicas), so
    the loss does not depend on the number of replicas."""
    probs, onehot = _probabilities_and_onehot(labels, logits)
    axes = [0, 1, 2, 3] if batch_dice else [1, 2, 3]
    power = 2.0 if squared_denominator else 1.0
    sums = [tf.reduce_sum(probs * onehot, axis=axes), tf.reduce_sum(probs ** power, axis=axes),
            tf.reduce_sum(onehot, axis=axes)]  # g^2 = g
    context = tf.distribute.get_replica_context()
    if batch_dice and context is not None and context.num_replicas_in_sync > 1:
        sums = context.all_reduce(tf.distribute.ReduceOp.SUM, sums)
    return tuple(sums)


def _mean_over_classes(scores, include_background):
    if not include_background:
        scores = scores[..., 1:]
    return tf.reduce_mean(scores)


def soft_dice_loss(labels, logits, smooth=1e-5, squared_denominator=False, batch_dice=True,
                   include_background=False):
    """1 - mean soft Dice (see the module docstring); a float32 scalar."""
    intersection, pred_sum, label_sum = _overlap_sums(labels, logits, squared_denominator, batch_dice)
    dice = (2.0 * intersection + smooth) / (pred_sum + label_sum + smooth)
    return 1.0 - _mean_over_classes(dice, include_background)


def soft_jaccard_loss(labels, logits, smooth=1e-5, squared_denominator=False, batch_dice=True,
                      include_background=False):
    """1 - mean soft Jaccard (intersection over union; see the module docstring); a float32 scalar."""
    intersection, pred_sum, label_sum = _overlap_sums(labels, logits, squared_denominator, batch_dice)
    jaccard = (intersection + smooth) / (pred_sum + label_sum - intersection + smooth)
    return 1.0 - _mean_over_classes(jaccard, include_background)


def cross_entropy_loss(labels, logits):
    """Mean voxel softmax cross-entropy in nats; a float32 scalar."""
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32)))


def deep_supervision_loss(loss_fn, labels, logits_by_level, level_strides=None):
    """Weighted sum of `loss_fn` over the levels of a deep-supervised output.

    level_strides[l]: the cumulative stride (Sx, Sy, Sz) (or one int for all axes) of level l relative
    to the labels, e.g. UNet.level_strides or layers.cumulative_strides(params model.strides, depth);
    at least one per level. None: 2^l on every axis (the isotropic U-Net).
    logits_by_level[l]: (N, ceil(X/Sx), ceil(Y/Sy), ceil(Z/Sz), K), scored against the labels
    sub-sampled by strided slicing, labels[:, ::Sx, ::Sy, ::Sz]. Level weights are 1, 1/2, 1/4, ...
    normalised to sum to 1.
    """
    levels = len(logits_by_level)
    if level_strides is None:
        level_strides = [2 ** level for level in range(levels)]
    if len(level_strides) < levels:
        raise ValueError(f"deep supervision: {levels} levels of logits but {len(level_strides)} level strides")
    weights = [0.5 ** level for level in range(levels)]
    total = 0.0
    for weight, logits, stride in zip(weights, logits_by_level, level_strides):
        sx, sy, sz = triple(stride)
        total += weight * loss_fn(labels[:, ::sx, ::sy, ::sz], logits)
    return total / sum(weights)


def _combined(overlap_loss, ce_weight, labels, logits):
    return overlap_loss(labels, logits) + ce_weight * cross_entropy_loss(labels, logits)


def make_loss(params):
    """`fn(labels (N, X, Y, Z) int, logits) -> float32 scalar` for the params' `loss` section.

    loss.name in dice, jaccard, dice_ce, jaccard_ce, ce; smooth; squared_denominator; batch_dice;
    include_background; ce_weight. `logits` is one tensor (N, X, Y, Z, K) or a deep-supervision
    list of them (see deep_supervision_loss), whose level strides come from params model.strides
    and model.depth (null: 2^l on every axis).
    """
    loss_params = params.loss
    overlap = dict(smooth=float(loss_params.smooth), squared_denominator=loss_params.squared_denominator,
                   batch_dice=loss_params.batch_dice, include_background=loss_params.include_background)
    dice = functools.partial(soft_dice_loss, **overlap)
    jaccard = functools.partial(soft_jaccard_loss, **overlap)
    ce_weight = float(loss_params.ce_weight)
    single = {"dice": dice, "jaccard": jaccard, "ce": cross_entropy_loss,
              "dice_ce": functools.partial(_combined, dice, ce_weight),
              "jaccard_ce": functools.partial(_combined, jaccard, ce_weight)}[loss_params.name]

    level_strides = cumulative_strides(params.model.strides, params.model.depth)

    def loss_fn(labels, logits):
        if isinstance(logits, (list, tuple)):
            return deep_supervision_loss(single, labels, logits, level_strides)
        return single(labels, logits)
    return loss_fn
