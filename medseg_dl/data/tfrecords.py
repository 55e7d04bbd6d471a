"""One subject <-> one `tf.train.Example` in its own TFRecord file (the set's index: index.py).

Schema of the Example (all keys required):

| feature              | type         | content                                                      |
|----------------------|--------------|--------------------------------------------------------------|
| subject              | bytes        | subject id (utf-8)                                           |
| image                | bytes        | float32 C-order array (X, Y, Z, C), normalised                |
| image_shape          | int64 x 4    | X, Y, Z, C                                                   |
| label                | bytes        | uint8 C-order array (X, Y, Z), values in [0, num_classes)    |
| spacing_mm           | float x 3    | voxel size in mm after preprocessing                         |
| affine               | bytes        | float64 4x4 voxel -> RAS mm after preprocessing              |
| class_locations      | bytes        | int32 (M, 3) voxel indices, sorted by class                  |
| class_location_counts| int64 x K    | how many of the M locations belong to each class             |
| original_shape       | int64 x 3    | voxel grid of the source file (before resampling/reorienting)|
| original_affine      | bytes        | float64 4x4 affine of the source file                        |

`decode_example` returns a dict of tensors: image (X,Y,Z,C) float32, label (X,Y,Z) int32,
spacing_mm (3,) float32, affine (4,4) float64, class_locations (M,3) int32,
class_location_counts (K,) int32, original_shape (3,) int32, original_affine (4,4) float64,
subject () string, shape (3,) int32 (spatial shape).
"""
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from medseg_dl import atomic

if TYPE_CHECKING:
    from medseg_dl.data.cases import Case


def record_name(subject_id: str, gzip: bool) -> str:
    return f"{subject_id}.tfrecord" + (".gz" if gzip else "")


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def serialize_case(case: "Case", class_locations: np.ndarray, class_location_counts: np.ndarray) -> bytes:
    """Serialise a labelled `data.cases.Case` with its sampling locations (M, 3) int32 sorted by class
    and their counts per class (K,) to the Example of the module docstring."""
    image = np.ascontiguousarray(case.image, np.float32)
    feature = {
        "subject": _bytes(case.subject_id.encode()),
        "image": _bytes(image.tobytes()),
        "image_shape": _ints(image.shape),
        "label": _bytes(np.ascontiguousarray(case.label, np.uint8).tobytes()),
        "spacing_mm": _floats(case.spacing_mm),
        "affine": _bytes(np.asarray(case.affine, np.float64).tobytes()),
        "class_locations": _bytes(np.ascontiguousarray(class_locations, np.int32).tobytes()),
        "class_location_counts": _ints(class_location_counts),
        "original_shape": _ints(case.original_shape),
        "original_affine": _bytes(np.asarray(case.original_affine, np.float64).tobytes()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_record(path: str, serialized: bytes, gzip: bool) -> None:
    """Write one serialised Example to `path` (GZIP-compressed if `gzip`), atomically."""
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    with atomic.replacing(path) as temporary:
        with tf.io.TFRecordWriter(temporary, options) as writer:
            writer.write(serialized)


FEATURES = {
    "subject": tf.io.FixedLenFeature([], tf.string),
    "image": tf.io.FixedLenFeature([], tf.string),
    "image_shape": tf.io.FixedLenFeature([4], tf.int64),
    "label": tf.io.FixedLenFeature([], tf.string),
    "spacing_mm": tf.io.FixedLenFeature([3], tf.float32),
    "affine": tf.io.FixedLenFeature([], tf.string),
    "class_locations": tf.io.FixedLenFeature([], tf.string),
    "class_location_counts": tf.io.VarLenFeature(tf.int64),
    "original_shape": tf.io.FixedLenFeature([3], tf.int64),
    "original_affine": tf.io.FixedLenFeature([], tf.string),
}


def decode_example(serialized: tf.Tensor, num_channels: Optional[int] = None) -> dict:
    """Parse one serialised Example into a dict of tensors (shapes in the module docstring).
    `num_channels`, when given, fixes the static channel dimension of `image`."""
    f = tf.io.parse_single_example(serialized, FEATURES)
    image_shape = tf.cast(f["image_shape"], tf.int32)
    image = tf.reshape(tf.io.decode_raw(f["image"], tf.float32), image_shape)
    if num_channels is not None:
        image = tf.ensure_shape(image, [None, None, None, num_channels])
    label = tf.reshape(tf.cast(tf.io.decode_raw(f["label"], tf.uint8), tf.int32), image_shape[:3])
    return {
        "subject": f["subject"],
        "image": image,
        "label": label,
        "shape": image_shape[:3],
        "spacing_mm": f["spacing_mm"],
        "affine": tf.reshape(tf.io.decode_raw(f["affine"], tf.float64), [4, 4]),
        "class_locations": tf.reshape(tf.io.decode_raw(f["class_locations"], tf.int32), [-1, 3]),
        "class_location_counts": tf.cast(tf.sparse.to_dense(f["class_location_counts"]), tf.int32),
        "original_shape": tf.cast(f["original_shape"], tf.int32),
        "original_affine": tf.reshape(tf.io.decode_raw(f["original_affine"], tf.float64), [4, 4]),
    }


def record_dataset(paths: Union[tf.Tensor, Sequence[str]], gzip: bool) -> tf.data.Dataset:
    """`tf.data.Dataset` of serialised Examples, one per path (no decoding)."""
    return tf.data.TFRecordDataset(paths, compression_type="GZIP" if gzip else "")
