"""The converted-case format, measured: bytes on disk and read times of the chunked case store (data/store.py)
beside the candidates it was chosen against, on the same W6 cases (BENCHMARKS.md; `datasets.write_cases` writes
them, as for `scale.py`).

    python benchmarks/storage.py [--cases 4] [--quick]

Per case: the source .nii.gz (image + label), our case folder (the image as CT conversion stores it, whole HU
in float16, byte-shuffled, zlib level 1, 64^3 chunks), the normalised float32 GZIP TFRecord of format 1, and
blosc2 (the same float16 HU, zstd, shuffle, the same chunks) when the `blosc2` package is importable; for each,
the seconds to read the whole case and one 96^3 box (ours and blosc2: only the chunks the box touches; the
TFRecord: the whole case). One line per format, medians over the cases (every case kept under `_runs`), in
benchmarks/results/storage.jsonl (not with --quick).
"""
import argparse
import importlib.util
import os
import shutil
import statistics
import tempfile

import nibabel as nib
import numpy as np
from datasets import write_cases
from harness import timed_runs
from machine_info import record

from medseg_dl.data import store  # before TensorFlow: medseg_dl sets its log level
import tensorflow as tf

BOX = 96


def box_of(shape):
    """(start, size) of the 96^3 box (smaller where the case is) in the middle of a case of `shape`."""
    size = np.minimum(BOX, shape)
    return (np.asarray(shape) - size) // 2, size


def normalised(image):
    """The CT normalisation's arithmetic on one case (clip, centre, scale) as float32: format 1 stored it."""
    return ((np.clip(image, -1000, 300) - 20.0) / 150.0).astype(np.float32)[..., None]


def timed(function):
    """Seconds of the second call of `function` (the first traces the TensorFlow functions, as a pipeline does
    once)."""
    return timed_runs(lambda _: function(), 1)[1][0]


def ours(image, label, folder):
    path = os.path.join(folder, "case.case")
    store.write_case(path, image, label, {"class_locations": np.zeros((0, 3), np.int32)},
                     {"shape": list(label.shape), "channels": 1})
    shape, start, size = (tf.constant(v, tf.int32) for v in (label.shape, *box_of(label.shape)))
    read_volume = tf.function(lambda: store.read_volume(tf.constant(path), shape, 1))  # as in the tf.data pipeline
    read_box = tf.function(lambda: store.read_box(tf.constant(path), start, size, 1))
    whole, box = timed(read_volume), timed(read_box)
    return _folder_mb(path), whole, box


def tfrecord(image, label, folder):
    path = os.path.join(folder, "case.tfrecord.gz")
    example = tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
        "label": tf.train.Feature(bytes_list=tf.train.BytesList(value=[label.tobytes()]))}))
    with tf.io.TFRecordWriter(path, tf.io.TFRecordOptions(compression_type="GZIP")) as writer:
        writer.write(example.SerializeToString())
    features = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.string)}

    @tf.function
    def read():
        serialized = tf.data.TFRecordDataset(path, compression_type="GZIP").get_single_element()
        parsed = tf.io.parse_single_example(serialized, features)
        return tf.io.decode_raw(parsed["image"], tf.float32), tf.io.decode_raw(parsed["label"], tf.uint8)
    whole = timed(read)
    return os.path.getsize(path) / 2**20, whole, whole


def blosc2_format(image, label, folder):
    import blosc2

    cparams = {"codec": blosc2.Codec.ZSTD, "clevel": 3, "filters": [blosc2.Filter.SHUFFLE]}
    paths = [os.path.join(folder, f"{name}.b2nd") for name in ("image", "label")]
    for array, path in zip((image.astype(np.float16), label), paths):
        blosc2.asarray(array, urlpath=path, chunks=(64, 64, 64, 1)[:array.ndim], mode="w", cparams=cparams)
    whole = timed(lambda: [blosc2.open(p)[:] for p in paths])
    start, size = box_of(label.shape)
    box = timed(lambda: [blosc2.open(p)[tuple(slice(a, a + n) for a, n in zip(start, size))] for p in paths])
    return sum(os.path.getsize(p) for p in paths) / 2**20, whole, box


def _folder_mb(path):
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128])
    parser.add_argument("--work", default="/tmp/medseg_scale")
    parser.add_argument("--quick", action="store_true", help="2 cases of 128 x 128 x 112")
    args = parser.parse_args()
    if args.quick:
        args.cases, args.shape, args.work = 2, [128, 128, 112], os.path.join(args.work, "quick")
    cases_dir = os.path.join(args.work, "cases_" + "x".join(map(str, args.shape)) + "_k5")
    write_cases(cases_dir, args.cases, args.shape, 5)
    formats = {"medseg_dl case store (float16 HU, zlib 1, 64^3 chunks)": ours,
               "TFRecord (normalised float32, GZIP; format 1)": tfrecord}
    if importlib.util.find_spec("blosc2"):
        formats["blosc2 (float16 HU, zstd 3 + shuffle, 64^3 chunks)"] = blosc2_format
    results = {name: [] for name in formats}
    sources = []
    for i in range(args.cases):
        names = [os.path.join(cases_dir, sub, f"case_{i:03d}.nii.gz") for sub in ("images", "labels")]
        sources.append(sum(os.path.getsize(n) for n in names) / 2**20)
        hu = np.asarray(nib.load(names[0]).dataobj)
        label = np.asarray(nib.load(names[1]).dataobj).astype(np.uint8)
        for name, write_and_read in formats.items():
            folder = tempfile.mkdtemp()
            image = normalised(hu) if write_and_read is tfrecord else hu.astype(np.float32)[..., None]
            results[name].append(write_and_read(image, label, folder))
            shutil.rmtree(folder)
    for name, runs in results.items():
        mb, whole, box = zip(*runs)
        record("storage", {"workload": "W6 cases", "format": name, "cases": args.cases, "shape": args.shape,
                           "mb_per_case": round(statistics.median(mb), 2),
                           "of_source": round(statistics.median(mb) / statistics.median(sources), 2),
                           "read_case_s": round(statistics.median(whole), 3),
                           "read_box_s": round(statistics.median(box), 4),
                           "mb_per_case_runs": [round(v, 2) for v in mb],
                           "read_case_s_runs": [round(v, 3) for v in whole],
                           "read_box_s_runs": [round(v, 4) for v in box],
                           "source_mb_per_case": round(statistics.median(sources), 2)}, keep=not args.quick)


if __name__ == "__main__":
    main()
