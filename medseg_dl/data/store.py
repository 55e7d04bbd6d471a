"""One converted case <-> one folder of compressed chunks, read back by TensorFlow ops: the whole case, or
any box of it (a patch, a window, a slab) without decoding the rest.

    <subject>.case/
        meta.json            what the index (dataset.json) also holds of the case: shape, channels, geometry
        image/<i>.<j>.<k>    chunk (i, j, k): chunk_vox[0] x chunk_vox[1] x chunk_vox[2] x C float16, the
                             image as preprocess.normalize stores it (ct channels in whole HU), C order,
                             bytes shuffled (all first bytes, then all second bytes), zlib-compressed;
                             chunks at the far edges are zero-padded to full size
        label/<i>.<j>.<k>    the same grid of uint8 labels, zlib-compressed
        class_locations      (M, 3) int32 voxel indices sorted by class, zlib-compressed
        ct_samples           (S, C) float32 foreground intensities, zlib-compressed (normalization ct only: the
                             dataset statistics are pooled from these, no image is read again)

Why this format (measured on a 256 x 256 x 128 CT-like case, docs in docs/data.md, "The converted format"): zlib is the
one codec TensorFlow decodes in its own ops (`tf.io.decode_compressed`), so the readers are graph ops that
run in parallel without the GIL and on tf.data service workers; chunks in files of their own are read
without the rest; float16 halves the bytes of float32 (normalised intensities keep about 3 significant
digits, whole HU up to 2048 are exact) and byte shuffling makes the high bytes compress. blosc2 decodes
2-3x faster but only from Python.

`write_case` writes a folder atomically (a temporary name, then a rename). `read_volume` and `read_box` are
TensorFlow functions of a case's path and index entry values; `read_arrays` reads with numpy (tests, tools).
"""
import json
import os
import zlib
from typing import Dict, Sequence, Tuple

import numpy as np
import tensorflow as tf

from medseg_dl.runtime import atomic

CASE_SUFFIX = ".case"
CHUNK_VOX = (64, 64, 64)  # voxels per chunk: a 96^3 patch or a 128^3 window touches 2-3 chunks per axis
ZLIB_LEVEL = 1  # level 6 saves 4% more and writes 2x slower (measured)


def case_name(subject_id: str) -> str:
    return subject_id + CASE_SUFFIX


def chunk_grid(shape_vox: Sequence[int], chunk_vox: Sequence[int] = CHUNK_VOX) -> Tuple[int, int, int]:
    """Chunks per axis covering `shape_vox` (3,)."""
    return tuple(-(-int(n) // int(c)) for n, c in zip(shape_vox, chunk_vox))


def _shuffled(array: np.ndarray) -> bytes:
    """The bytes of `array`, byte-shuffled: byte 0 of every element, then byte 1, ..."""
    return np.frombuffer(array.tobytes(), np.uint8).reshape(-1, array.itemsize).T.tobytes()


def _chunks(array: np.ndarray, chunk_vox: Sequence[int]):
    """((i, j, k), chunk) for each chunk of `array` (X, Y, Z[, C]), zero-padded to `chunk_vox` at the edges."""
    for index in np.ndindex(*chunk_grid(array.shape[:3], chunk_vox)):
        box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunk_vox))
        chunk = array[box]
        padding = [(0, c - n) for c, n in zip(chunk_vox, chunk.shape[:3])] + [(0, 0)] * (array.ndim - 3)
        yield index, np.pad(chunk, padding) if any(p[1] for p in padding) else chunk


def write_case(path: str, image: np.ndarray, label: np.ndarray, small_arrays: Dict[str, np.ndarray], meta: Dict,
               chunk_vox: Sequence[int] = CHUNK_VOX) -> None:
    """Write one case folder at `path` atomically: image (X, Y, Z, C) (stored as float16), label (X, Y, Z)
    uint8-valued, `small_arrays` by file name (class_locations (M, 3) int32, ct_samples (S, C) float32) and
    `meta` (JSON-able: geometry and counts). Memory: one chunk at a time besides the arrays given."""
    with atomic.replacing(path) as folder:
        for name, array, dtype in (("image", image, np.float16), ("label", label, np.uint8)):
            os.makedirs(os.path.join(folder, name))
            for index, chunk in _chunks(array, chunk_vox):
                data = np.ascontiguousarray(chunk, dtype)
                with open(os.path.join(folder, name, ".".join(map(str, index))), "wb") as f:
                    f.write(zlib.compress(_shuffled(data) if data.itemsize > 1 else data.tobytes(), ZLIB_LEVEL))
        for name, array in small_arrays.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(zlib.compress(np.ascontiguousarray(array).tobytes(), ZLIB_LEVEL))
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump({**meta, "chunk_vox": list(chunk_vox)}, f)


def read_small(path: str, name: str, dtype, width: int) -> np.ndarray:
    """The small array `name` (class_locations: int32, width 3; ct_samples: float32, width C) of the case folder
    `path`, with numpy: (M, width)."""
    with open(os.path.join(path, name), "rb") as f:
        return np.frombuffer(zlib.decompress(f.read()), dtype).reshape(-1, width)


def _read_chunk(path: tf.Tensor, stored: tf.DType, chunk_shape: tf.Tensor) -> tf.Tensor:
    """One chunk file of `stored` values (uint8, or byte-shuffled float16) -> `chunk_shape` (cx, cy, cz[, C])
    float32. No TensorFlow tensor here is float16 or a small integer type that is transposed: on a CPU
    without AVX-512, oneDNN logs an error line for either ("oneDNN supports DT_HALF only on platforms with
    AVX-512"), so the float16 bits are decoded with integer arithmetic and labels travel as float32."""
    raw = tf.io.decode_raw(tf.io.decode_compressed(tf.io.read_file(path), "ZLIB"), tf.uint8)
    if stored == tf.uint8:
        return tf.reshape(tf.cast(raw, tf.float32), chunk_shape)
    low, high = tf.split(tf.cast(raw, tf.int32), 2)  # the shuffled planes: all first bytes, then all second
    return tf.reshape(float16_bits_to_float32(low + high * 256), chunk_shape)


def float16_bits_to_float32(bits: tf.Tensor) -> tf.Tensor:
    """IEEE half-precision bit patterns (any shape, int32 in [0, 65535]) -> their values, same shape, float32,
    exactly for every finite pattern (inf and NaN never reach the store: data/preprocess.py). The exponent is
    rebiased (+112) with the mantissa shifted into place; a zero or subnormal pattern (exponent field 0) is
    read as 2^-14 + its value (rebiased +113) and 2^-14 is taken off, exactly (Sterbenz); the sign bit is put
    back last, so -0 stays -0."""
    magnitude = tf.bitwise.bitwise_and(bits, 0x7FFF)
    subnormal = tf.cast(magnitude < 0x400, tf.int32)
    rebiased = tf.bitcast(tf.bitwise.left_shift(magnitude, 13) + (112 + subnormal) * 2 ** 23, tf.float32)
    unsigned = rebiased - tf.cast(subnormal, tf.float32) * 2.0 ** -14
    sign = tf.bitwise.left_shift(tf.bitwise.right_shift(bits, 15), 31)
    return tf.bitcast(tf.bitwise.bitwise_or(tf.bitcast(unsigned, tf.int32), sign), tf.float32)


def _read_array(case: tf.Tensor, name: str, start: tf.Tensor, size: tf.Tensor, channels: int,
                stored: tf.DType, chunk_vox: Sequence[int]) -> tf.Tensor:
    """The box [start, start + size) (3,) int32, inside the case, of its array `name` (image or label, `stored`
    as float16 or uint8), as (size..., channels) float32 (channels 0: (size...) uint8 labels): only the chunks the
    box touches are read, and the box is assembled in float32 (`_read_chunk` says why not in 2 bytes)."""
    chunk = tf.constant(chunk_vox, tf.int32)
    first, last = start // chunk, (start + size - 1) // chunk
    counts = last - first + 1
    grid = tf.stack(tf.meshgrid(*[tf.range(first[a], last[a] + 1) for a in range(3)], indexing="ij"), -1)
    names = tf.strings.reduce_join(tf.strings.as_string(tf.reshape(grid, [-1, 3])), axis=-1, separator=".")
    folder = tf.strings.join([case, "/", name, "/"])
    shape = tf.concat([chunk, [channels]], 0) if channels else chunk
    chunks = tf.map_fn(lambda n: _read_chunk(folder + n, stored, shape), names,
                       fn_output_signature=tf.TensorSpec(None, tf.float32))
    tiles = tf.reshape(chunks, tf.concat([counts, shape], 0))  # (nx, ny, nz, cx, cy, cz[, C])
    order = [0, 3, 1, 4, 2, 5] + ([6] if channels else [])
    joined = tf.reshape(tf.transpose(tiles, order), tf.concat([counts * chunk, shape[3:]], 0))
    offset = start - first * chunk
    box = tf.slice(joined, tf.concat([offset, [0] * (1 if channels else 0)], 0),
                   tf.concat([size, [channels] if channels else []], 0))
    return box if stored == tf.float16 else tf.cast(box, tf.uint8)


def read_box(case: tf.Tensor, start: tf.Tensor, size: tf.Tensor, channels: int,
             chunk_vox: Sequence[int] = CHUNK_VOX) -> Tuple[tf.Tensor, tf.Tensor]:
    """(image (size..., channels) float32, label size (3,) uint8) of the box [start, start + size) (3,) int32
    of the case folder `case` () string; the box lies inside the case (shape: its index entry)."""
    return (_read_array(case, "image", start, size, channels, tf.float16, chunk_vox),
            _read_array(case, "label", start, size, 0, tf.uint8, chunk_vox))


def read_volume(case: tf.Tensor, shape_vox: tf.Tensor, channels: int,
                chunk_vox: Sequence[int] = CHUNK_VOX) -> Dict[str, tf.Tensor]:
    """The whole case folder `case` () string of spatial shape `shape_vox` (3,) int32: image (X, Y, Z, C)
    float32, label (X, Y, Z) uint8 and class_locations (M, 3) int32."""
    image, label = read_box(case, tf.zeros([3], tf.int32), shape_vox, channels, chunk_vox)
    raw = tf.io.decode_compressed(tf.io.read_file(tf.strings.join([case, "/class_locations"])), "ZLIB")
    return {"image": tf.ensure_shape(image, [None, None, None, channels]), "label": label,
            "class_locations": tf.reshape(tf.io.decode_raw(raw, tf.int32), [-1, 3])}


def read_arrays(path: str) -> Dict[str, np.ndarray]:
    """Every array of a case folder with numpy (no TensorFlow): image (X, Y, Z, C) float16, label (X, Y, Z)
    uint8, class_locations (M, 3) int32, and its meta.json under "meta"."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    shape, channels, chunk_vox = meta["shape"], meta["channels"], meta["chunk_vox"]
    grid = chunk_grid(shape, chunk_vox)
    arrays = {}
    for name, dtype, tail in (("image", np.float16, [channels]), ("label", np.uint8, [])):
        full = np.zeros([g * c for g, c in zip(grid, chunk_vox)] + tail, dtype)
        for index in np.ndindex(*grid):
            with open(os.path.join(path, name, ".".join(map(str, index))), "rb") as f:
                raw = np.frombuffer(zlib.decompress(f.read()), np.uint8)
            if dtype == np.float16:
                raw = raw.reshape(2, -1).T.copy()
            box = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunk_vox))
            full[box] = raw.view(dtype).reshape([*chunk_vox, *tail])
        arrays[name] = full[tuple(slice(0, n) for n in shape)]
    arrays["class_locations"] = read_small(path, "class_locations", np.int32, 3)
    return {**arrays, "meta": meta}
