"""Streaming hard Dice: true/false positives and false negatives per class, summed over batches."""
import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="medseg_dl")
class StreamingDice(keras.metrics.Metric):
    """Hard Dice per class, 2 TP / (2 TP + FP + FN), over every voxel seen since the last reset.

    update_state(labels (N, X, Y, Z) int, predictions): predictions are logits or probabilities
    (N, X, Y, Z, K) (arg-maxed) or class indices (N, X, Y, Z). result(): float32 (K,); a class
    absent from labels and predictions alike has Dice NaN. mean_foreground(): the mean over
    classes 1..K-1 that are not NaN. The counts are float64 variables (exact up to 2^53 voxels),
    synchronised on read with SUM aggregation, so under tf.distribute the replicas' counts add up.
    """

    def __init__(self, num_classes, class_names=None, name="dice", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [f"class_{k}" for k in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        counts = dict(shape=(num_classes,), initializer="zeros", dtype="float64", aggregation="sum")
        self.true_positives = self.add_variable(name="true_positives", **counts)
        self.false_positives = self.add_variable(name="false_positives", **counts)
        self.false_negatives = self.add_variable(name="false_negatives", **counts)

    def update_state(self, labels, predictions, sample_weight=None):
        """Add the counts of one batch; sample_weight is not supported (must be None)."""
        if sample_weight is not None:
            raise ValueError("StreamingDice does not support sample_weight")
        labels = tf.cast(labels, tf.int32)
        predictions = tf.convert_to_tensor(predictions)
        if predictions.shape.rank == labels.shape.rank + 1:
            predictions = tf.argmax(predictions, axis=-1, output_type=tf.int32)
        k = self.num_classes
        pairs = tf.reshape(labels * k + tf.cast(predictions, tf.int32), [-1])
        counts = tf.math.unsorted_segment_sum(tf.ones_like(pairs, tf.int64), pairs, k * k)  # XLA-compilable
        confusion = tf.reshape(counts, (k, k))
        confusion = tf.cast(confusion, tf.float64)  # rows: labels, columns: predictions
        true_positives = tf.linalg.diag_part(confusion)
        self.true_positives.assign_add(true_positives)
        self.false_positives.assign_add(tf.reduce_sum(confusion, axis=0) - true_positives)
        self.false_negatives.assign_add(tf.reduce_sum(confusion, axis=1) - true_positives)

    def result(self):
        tp = tf.convert_to_tensor(self.true_positives)
        denominator = 2.0 * tp + tf.convert_to_tensor(self.false_positives) + tf.convert_to_tensor(self.false_negatives)
        dice = tf.where(denominator > 0, 2.0 * tp / tf.maximum(denominator, 1.0), tf.constant(float("nan"), tf.float64))
        return tf.cast(dice, tf.float32)

    def mean_foreground(self):
        """Mean Dice over the foreground classes with a defined Dice (NaN when there is none)."""
        foreground = self.result()[1:]
        defined = tf.boolean_mask(foreground, tf.logical_not(tf.math.is_nan(foreground)))
        return tf.reduce_mean(defined)  # NaN for an empty set

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "class_names": self.class_names}
