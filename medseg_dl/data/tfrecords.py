"""One subject <-> one `tf.train.Example` in its own TFRecord file; `dataset.json` indexes the set.

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
import json
import os

import numpy as np
import tensorflow as tf

from medseg_dl.errors import DataError

INDEX_NAME = "dataset.json"
MAX_CLASSES = 256  # labels are stored as uint8


def record_name(subject_id, gzip):
    return f"{subject_id}.tfrecord" + (".gz" if gzip else "")


def _bytes(value):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def serialize_subject(case):
    """Serialise a preprocessed case (dict of numpy arrays, see the module docstring) to bytes."""
    image = np.ascontiguousarray(case["image"], np.float32)
    feature = {
        "subject": _bytes(case["subject"].encode()),
        "image": _bytes(image.tobytes()),
        "image_shape": _ints(image.shape),
        "label": _bytes(np.ascontiguousarray(case["label"], np.uint8).tobytes()),
        "spacing_mm": _floats(case["spacing_mm"]),
        "affine": _bytes(np.asarray(case["affine"], np.float64).tobytes()),
        "class_locations": _bytes(np.ascontiguousarray(case["class_locations"], np.int32).tobytes()),
        "class_location_counts": _ints(case["class_location_counts"]),
        "original_shape": _ints(case["original_shape"]),
        "original_affine": _bytes(np.asarray(case["original_affine"], np.float64).tobytes()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_record(path, serialized, gzip):
    """Write one serialised Example to `path` under a temporary name, then rename (atomic)."""
    tmp = f"{path}.tmp{os.getpid()}"
    options = tf.io.TFRecordOptions(compression_type="GZIP" if gzip else "")
    try:
        with tf.io.TFRecordWriter(tmp, options) as writer:
            writer.write(serialized)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


def decode_example(serialized, num_channels=None):
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


def record_dataset(paths, gzip):
    """`tf.data.Dataset` of serialised Examples, one per path (no decoding)."""
    return tf.data.TFRecordDataset(paths, compression_type="GZIP" if gzip else "")


def read_index(tfrecords_dir):
    """The `dataset.json` of a converted folder; `DataError` if the folder was not converted."""
    path = os.path.join(tfrecords_dir, INDEX_NAME)
    if not os.path.isfile(path):
        raise DataError(f"{path}: not found; convert the dataset first with `medseg convert --params P`")
    with open(path) as f:
        return json.load(f)


def write_index(tfrecords_dir, index):
    """Write `dataset.json` atomically."""
    path = os.path.join(tfrecords_dir, INDEX_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, path)


def record_paths(tfrecords_dir, subject_ids):
    """Paths of the records of `subject_ids` from the index; `DataError` for a subject not converted."""
    index = read_index(tfrecords_dir)
    missing = [s for s in subject_ids if s not in index["subjects"]]
    if missing:
        raise DataError(f"{os.path.join(tfrecords_dir, INDEX_NAME)}: subjects {missing[:3]} are not converted; "
                        f"run `medseg convert` with the same params")
    return [os.path.join(tfrecords_dir, index["subjects"][s]["file"]) for s in subject_ids]
