"""What the network's outputs stand for: one softmax over exclusive labels, or one sigmoid per region;
and the ignore label.

    targets = Targets.from_params(params.data)
    targets.outputs                         # K: num_classes (labels) or the number of regions
    targets.membership()                    # (256, K) float32: row v = what label value v means per output
    targets.structures                      # [(name, label values)] scored by the evaluator
    targets.labels_of(logits)               # (X, Y, Z, K) -> (X, Y, Z) uint8: arg-max, or regions painted
    targets.encode_in_graph(labels)         # (target (..., K) float32, valid (...) float32) in TF ops

Labels (`data.regions` null): output k is label k; a voxel's target is the one-hot row of its label.
Regions (`data.regions`: a list of {name, labels, paint}, BraTS's whole tumour / tumour core /
enhancing tumour, nnU-Net's `regions_class_order`): output r is 1 where the voxel's label is one of the
region's label values; the regions are painted back into one label map in list order, region r painting
its `paint` value where its sigmoid exceeds 0.5 (logit > 0), a later region overwriting an earlier one.
The ignore label (`data.ignore_label`, a value >= num_classes) has a membership row of zeros and is
invalid (`valid()`): its voxels add nothing to any loss term or metric and are never patch centres.
The params layer checks the rules (config/params.py `_check_targets`); this module only reads them.
"""
import dataclasses
import json
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from medseg_dl.errors import DataError

LABEL_VALUES = 256  # label maps are uint8


@dataclasses.dataclass(frozen=True)
class Region:
    """A named set of label values (ints in 1..num_classes-1) and the value it paints back."""

    name: str
    labels: Tuple[int, ...]
    paint: int


@dataclasses.dataclass(frozen=True)
class Targets:
    """The meaning of the network's K outputs (see the module docstring).

    num_classes: label values 0..num_classes-1 of the label maps; class_names: one per label value;
    regions: () for softmax over labels, else the regions in paint order; ignore_label: None or a value
    >= num_classes whose voxels are left out.
    """

    num_classes: int
    class_names: Tuple[str, ...]
    regions: Tuple[Region, ...] = ()
    ignore_label: Optional[int] = None

    @classmethod
    def from_params(cls, data) -> "Targets":
        """From the params' data section (num_classes, class_names, regions, ignore_label), already checked."""
        regions = tuple(Region(r["name"], tuple(int(v) for v in r["labels"]), int(r["paint"]))
                        for r in (data.regions or []))
        return cls(int(data.num_classes), tuple(data.class_names), regions, data.ignore_label)

    @classmethod
    def from_dict(cls, values: Dict) -> "Targets":
        """The Targets of `to_dict`'s JSON form."""
        regions = tuple(Region(r["name"], tuple(r["labels"]), r["paint"]) for r in values["regions"])
        return cls(values["num_classes"], tuple(values["class_names"]), regions, values["ignore_label"])

    @property
    def uses_regions(self) -> bool:
        return bool(self.regions)

    @property
    def outputs(self) -> int:
        """K: the network's output channels."""
        return len(self.regions) if self.regions else self.num_classes

    @property
    def output_names(self) -> List[str]:
        """A name per output channel: the class names, or the region names."""
        return [r.name for r in self.regions] if self.regions else list(self.class_names)

    @property
    def structures(self) -> List[Tuple[str, Tuple[int, ...]]]:
        """What is scored, as (name, label values): each foreground class alone, or each region."""
        if self.regions:
            return [(r.name, r.labels) for r in self.regions]
        return [(self.class_names[k], (k,)) for k in range(1, self.num_classes)]

    def membership(self) -> np.ndarray:
        """(256, K) float32: row v is the target of a voxel of label v (one-hot, or 1 per region holding v;
        zeros for the ignore label and for values that are no class)."""
        table = np.zeros((LABEL_VALUES, self.outputs), np.float32)
        if self.regions:
            for r, region in enumerate(self.regions):
                table[list(region.labels), r] = 1.0
        else:
            table[np.arange(self.num_classes), np.arange(self.num_classes)] = 1.0
        return table

    def valid(self) -> np.ndarray:
        """(256,) float32: 0 for the ignore label, 1 for every other value."""
        table = np.ones(LABEL_VALUES, np.float32)
        if self.ignore_label is not None:
            table[self.ignore_label] = 0.0
        return table

    def labels_of(self, logits: np.ndarray) -> np.ndarray:
        """(..., K) logits -> (...) uint8 label map (numpy): the arg-max over labels, or the regions painted in
        order, region r painting its value where its logit is > 0 (sigmoid > 0.5)."""
        if not self.regions:
            return np.argmax(logits, axis=-1).astype(np.uint8)
        labels = np.zeros(logits.shape[:-1], np.uint8)
        for r, region in enumerate(self.regions):
            labels[logits[..., r] > 0] = region.paint
        return labels

    def labels_of_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """(..., K) float32 probabilities -> (...) uint8 label map (numpy), as `labels_of` the logits would give:
        the arg-max over the classes, or the regions painted where their probability exceeds 0.5 (p - 0.5 has the
        sign of the logit)."""
        return self.labels_of(probabilities - np.float32(0.5) if self.regions else probabilities)

    def labels_in_graph(self, logits: tf.Tensor) -> tf.Tensor:
        """`labels_of` in TensorFlow ops: (..., K) float logits -> (...) uint8."""
        if not self.regions:
            return tf.cast(tf.argmax(logits, axis=-1), tf.uint8)
        labels = tf.zeros(tf.shape(logits)[:-1], tf.uint8)
        for r, region in enumerate(self.regions):
            labels = tf.where(logits[..., r] > 0, tf.constant(region.paint, tf.uint8), labels)
        return labels

    def probabilities_in_graph(self, logits: tf.Tensor) -> tf.Tensor:
        """(..., K) float logits -> (..., K) probabilities: softmax over the labels, or a sigmoid per region."""
        return tf.sigmoid(logits) if self.regions else tf.nn.softmax(logits, axis=-1)

    def encode_in_graph(self, labels: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """(...) int label map -> (targets (..., K) float32 (`membership` rows), valid (...) float32 (0 at the
        ignore label))."""
        labels = tf.cast(labels, tf.int32)
        return (tf.gather(tf.constant(self.membership()), labels),
                tf.gather(tf.constant(self.valid()), labels))

    def to_dict(self) -> Dict:
        """JSON form: {num_classes, class_names, regions: [{name, labels, paint}], ignore_label}."""
        return {"num_classes": self.num_classes, "class_names": list(self.class_names),
                "regions": [dataclasses.asdict(r) | {"labels": list(r.labels)} for r in self.regions],
                "ignore_label": self.ignore_label}


def regions_from_dataset_json(path: str) -> Tuple[Optional[List[Dict]], Optional[int]]:
    """(data.regions, data.ignore_label) declared by an MSD / nnU-Net v2 dataset.json: `labels` whose values
    are lists (regions, painted in `regions_class_order`) and an "ignore" label; (None, None) without them.

    nnU-Net v2 writes {"labels": {"background": 0, "whole tumor": [1, 2, 3], ..., "ignore": 4},
    "regions_class_order": [1, 2, 3]}: the regions in the order listed, each painting the value at the same
    place of regions_class_order."""
    index = json.load(open(path))
    labels = index.get("labels") or {}
    if labels and list(labels)[0].isdigit():  # MSD writes {"0": "background", ...}: no regions
        return None, None
    ignore = labels.get("ignore")
    declared = [(name, value) for name, value in labels.items() if isinstance(value, list)]
    if not declared:
        return None, (int(ignore) if ignore is not None else None)
    order = index.get("regions_class_order")
    if order is None or len(order) != len(declared):
        raise DataError(f"{path}: {len(declared)} regions in labels but regions_class_order is {order!r}; "
                        f"give one paint value per region, in the order of labels")
    regions = [{"name": name, "labels": [int(v) for v in values], "paint": int(paint)}
               for (name, values), paint in zip(declared, order)]
    return regions, (int(ignore) if ignore is not None else None)

