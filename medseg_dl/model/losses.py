"""Segmentation losses on labels (N, X, Y, Z) int (uint8 or int32 label maps) and float logits
(N, X, Y, Z, K), K = `Targets.outputs`; every loss is a float32 scalar.

The Targets (data/targets.py) give each voxel a target row g (K,) float32 (the one-hot row of its label,
or 1 per region holding it) and a weight v (0 at the ignore label, else 1). The probabilities p are the
softmax over the K labels, or one sigmoid per region. Soft overlap per output k, summed over the voxels
of the whole (global: all replicas') batch (batch_dice) or of each sample, every sum weighted by v:
    Dice_k    = (2 sum v p g + smooth) / (sum v p + sum v g + smooth)
    Jaccard_k = (sum v p g + smooth) / (sum v p + sum v g - sum v p g + smooth)
With squared_denominator, p and g are squared in the denominators. The loss is 1 - the mean over
outputs (and samples): labels leave out the background (output 0) unless include_background; regions
count all (there is no background output). The cross-entropy is the mean over the valid voxels (of the
global batch) of the softmax cross-entropy, or, for regions, of the binary cross-entropy averaged over
the regions (nnU-Net's region loss is Dice + BCE); the combined losses add ce_weight times it.
An ignored voxel adds nothing to any sum, so the gradient with respect to its logits is exactly zero.
Without an ignore label v = 1 everywhere and the losses are the plain soft Dice / Jaccard / cross-entropy.
"""
import functools

import tensorflow as tf

from medseg_dl.data.targets import Targets
from medseg_dl.model.layers import cumulative_strides, triple


def _encode(targets, labels, logits):
    """(logits (N, X, Y, Z, K), target (N, X, Y, Z, K), valid (N, X, Y, Z)), all float32."""
    if logits.shape[-1] is not None and logits.shape[-1] != targets.outputs:
        raise ValueError(f"logits have {logits.shape[-1]} channels; the targets have {targets.outputs} outputs")
    target, valid = targets.encode_in_graph(labels)
    return tf.cast(logits, tf.float32), target, valid


def _sum_over_replicas(values):
    """(the list of tensors `values` summed over the replicas of a distribution strategy's step, the number
    of replicas); unchanged, 1 with one replica."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values, 1
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values), context.num_replicas_in_sync


def _overlap_sums(targets, labels, logits, squared_denominator, batch_dice):
    """Intersection and the two denominator sums, valid voxels only, shape (K,) if batch_dice else (N, K).
    With batch_dice under a distribution strategy the sums are those of the global batch (summed over all
    replicas), so the loss does not depend on the number of replicas."""
    logits, target, valid = _encode(targets, labels, logits)
    probs = targets.probabilities_in_graph(logits) * valid[..., None]  # ignored voxels' target rows are 0
    axes = [0, 1, 2, 3] if batch_dice else [1, 2, 3]
    power = 2.0 if squared_denominator else 1.0
    sums = [tf.reduce_sum(probs * target, axis=axes), tf.reduce_sum(probs ** power, axis=axes),
            tf.reduce_sum(target, axis=axes)]  # g^2 = g
    if batch_dice:
        sums, _ = _sum_over_replicas(sums)
    return tuple(sums)


def _mean_over_outputs(targets, scores, include_background):
    if not (targets.uses_regions or include_background):
        scores = scores[..., 1:]
    return tf.reduce_mean(scores)


def soft_dice_loss(targets: Targets, labels, logits, smooth=1e-5, squared_denominator=False, batch_dice=True,
                   include_background=False):
    """1 - mean soft Dice (see the module docstring); a float32 scalar."""
    intersection, pred_sum, label_sum = _overlap_sums(targets, labels, logits, squared_denominator, batch_dice)
    dice = (2.0 * intersection + smooth) / (pred_sum + label_sum + smooth)
    return 1.0 - _mean_over_outputs(targets, dice, include_background)


def soft_jaccard_loss(targets: Targets, labels, logits, smooth=1e-5, squared_denominator=False, batch_dice=True,
                      include_background=False):
    """1 - mean soft Jaccard (intersection over union; see the module docstring); a float32 scalar."""
    intersection, pred_sum, label_sum = _overlap_sums(targets, labels, logits, squared_denominator, batch_dice)
    jaccard = (intersection + smooth) / (pred_sum + label_sum - intersection + smooth)
    return 1.0 - _mean_over_outputs(targets, jaccard, include_background)


def cross_entropy_loss(targets: Targets, labels, logits):
    """Mean over the valid voxels of the softmax cross-entropy, or of the binary cross-entropy averaged over
    the regions, in nats; a float32 scalar (0 when no voxel is valid). Under a distribution strategy of R
    replicas: R times this replica's sum divided by the number of valid voxels of the global batch, so that
    the mean over the replicas (the training step's) is the mean of the global batch."""
    logits, target, valid = _encode(targets, labels, logits)
    if targets.uses_regions:
        voxel_ce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits), axis=-1)
    else:
        voxel_ce = tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits)
    (valid_voxels,), replicas = _sum_over_replicas([tf.reduce_sum(valid)])
    return tf.reduce_sum(voxel_ce * valid) * replicas / tf.maximum(valid_voxels, 1.0)


def deep_supervision_loss(loss_fn, labels, logits_by_level, level_strides=None):
    """Weighted sum of `loss_fn(labels, logits)` over the levels of a deep-supervised output.

    level_strides[l]: the cumulative stride (Sx, Sy, Sz) (or one int for all axes) of level l relative
    to the labels, e.g. UNet.level_strides or layers.cumulative_strides(params model.strides, depth);
    at least one per level. None: 2^l on every axis (the isotropic U-Net).
    logits_by_level[l]: (N, ceil(X/Sx), ceil(Y/Sy), ceil(Z/Sz), K), scored against the labels
    sub-sampled by strided slicing, labels[:, ::Sx, ::Sy, ::Sz] (the ignored voxels follow). Level weights
    are 1, 1/2, 1/4, ... normalised to sum to 1.
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


def _combined(overlap_loss, ce_weight, targets, labels, logits):
    return overlap_loss(targets, labels, logits) + ce_weight * cross_entropy_loss(targets, labels, logits)


def make_loss(params):
    """`fn(labels (N, X, Y, Z) int, logits) -> float32 scalar` for the params' `loss` section, on the
    `Targets` of params.data (labels or regions, ignore label).

    loss.name in dice, jaccard, dice_ce, jaccard_ce, ce; smooth; squared_denominator; batch_dice;
    include_background (labels only); ce_weight. `logits` is one tensor (N, X, Y, Z, K) or a
    deep-supervision list of them (see deep_supervision_loss), whose level strides come from params
    model.strides and model.depth (null: 2^l on every axis).
    """
    loss_params = params.loss
    overlap = dict(smooth=float(loss_params.smooth), squared_denominator=loss_params.squared_denominator,
                   batch_dice=loss_params.batch_dice, include_background=loss_params.include_background)
    dice = functools.partial(soft_dice_loss, **overlap)
    jaccard = functools.partial(soft_jaccard_loss, **overlap)
    ce_weight = float(loss_params.ce_weight)
    chosen = {"dice": dice, "jaccard": jaccard, "ce": cross_entropy_loss,
              "dice_ce": functools.partial(_combined, dice, ce_weight),
              "jaccard_ce": functools.partial(_combined, jaccard, ce_weight)}[loss_params.name]
    single = functools.partial(chosen, Targets.from_params(params.data))
    level_strides = cumulative_strides(params.model.strides, params.model.depth)

    def loss_fn(labels, logits):
        if isinstance(logits, (list, tuple)):
            return deep_supervision_loss(single, labels, logits, level_strides)
        return single(labels, logits)
    return loss_fn
