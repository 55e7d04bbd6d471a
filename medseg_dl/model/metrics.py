"""Streaming hard Dice: true/false positives and false negatives per output, summed over batches."""

import keras
import tensorflow as tf

from medseg_dl.data.targets import Targets


@keras.saving.register_keras_serializable(package="medseg_dl")
class StreamingDice(keras.metrics.Metric):
    """Hard Dice per output of the `Targets` (class or region), 2 TP / (2 TP + FP + FN), over every valid
    voxel seen since the last reset (voxels of the ignore label are left out).

    update_state(labels (N, X, Y, Z) int, predictions): for labels (softmax), predictions are logits or
    probabilities (N, X, Y, Z, K) (arg-maxed) or class indices (N, X, Y, Z), and a voxel counts for the one
    output of its label; for regions, predictions are logits (N, X, Y, Z, K), region r predicted where its
    logit is > 0, and a voxel counts for every region holding its label. result(): float32 (K,), named by `output_names`; an output absent from labels and
    predictions alike has Dice NaN. mean_foreground(): the mean over the outputs that are not NaN, the
    background (class 0) left out for labels. The counts are float64 variables (exact up to 2^53 voxels),
    synchronised on read with SUM aggregation, so under tf.distribute the replicas' counts add up.
    """

    def __init__(self, targets: Targets, name="dice", **kwargs):
        if not isinstance(targets, Targets):
            raise ValueError(f"targets = {targets!r}: expected a Targets (Targets.from_params(params.data))")
        super().__init__(name=name, **kwargs)
        self.targets = targets
        self.output_names = targets.output_names
        counts = dict(shape=(targets.outputs,), initializer="zeros", dtype="float64", aggregation="sum")
        self.true_positives = self.add_variable(name="true_positives", **counts)
        self.false_positives = self.add_variable(name="false_positives", **counts)
        self.false_negatives = self.add_variable(name="false_negatives", **counts)

    def update_state(self, labels, predictions, sample_weight=None):
        """Add the counts of one batch; sample_weight is not supported (must be None)."""
        if sample_weight is not None:
            raise ValueError("StreamingDice does not support sample_weight")
        labels = tf.convert_to_tensor(labels)
        reference, valid = self.targets.encode_in_graph(labels)
        reference = reference > 0.5  # (N, X, Y, Z, K); the rows of ignored voxels are 0
        predicted = tf.logical_and(self._predicted(labels, predictions), valid[..., None] > 0.5)

        def count(voxels):  # (N, X, Y, Z, K) bool -> (K,) float64, exact
            return tf.cast(tf.reduce_sum(tf.cast(voxels, tf.int64), axis=[0, 1, 2, 3]), tf.float64)
        self.true_positives.assign_add(count(tf.logical_and(predicted, reference)))
        self.false_positives.assign_add(count(tf.logical_and(predicted, tf.logical_not(reference))))
        self.false_negatives.assign_add(count(tf.logical_and(tf.logical_not(predicted), reference)))

    def _predicted(self, labels, predictions):
        """(N, X, Y, Z, K) bool: the outputs predicted at each voxel."""
        predictions = tf.convert_to_tensor(predictions)
        if self.targets.uses_regions:
            if predictions.shape.rank != labels.shape.rank + 1:
                raise ValueError(f"predictions of shape {predictions.shape}: regions need logits (N, X, Y, Z, K)")
            return predictions > 0
        if predictions.shape.rank == labels.shape.rank + 1:
            predictions = tf.argmax(predictions, axis=-1, output_type=tf.int32)
        return tf.one_hot(tf.cast(predictions, tf.int32), self.targets.outputs, on_value=True, off_value=False)

    def result(self):
        tp = tf.convert_to_tensor(self.true_positives)
        denominator = 2.0 * tp + tf.convert_to_tensor(self.false_positives) + tf.convert_to_tensor(self.false_negatives)
        dice = tf.where(denominator > 0, 2.0 * tp / tf.maximum(denominator, 1.0), tf.constant(float("nan"), tf.float64))
        return tf.cast(dice, tf.float32)

    def mean_foreground(self):
        """Mean Dice over the foreground classes (labels) or all regions, those with a defined Dice (NaN when
        there is none)."""
        foreground = self.result() if self.targets.uses_regions else self.result()[1:]
        defined = tf.boolean_mask(foreground, tf.logical_not(tf.math.is_nan(foreground)))
        return tf.reduce_mean(defined)  # NaN for an empty set

    def get_config(self):
        return {**super().get_config(), "targets": self.targets.to_dict()}

    @classmethod
    def from_config(cls, config):
        """The metric of `get_config`."""
        config = dict(config)
        return cls(Targets.from_dict(config.pop("targets")), **config)
