"""The tf.data pipelines: training patches (`train_inputs`, its patch stage `patch_dataset`) and
whole volumes for evaluation metrics (`volume_inputs`).

Training: shuffled files -> parallel interleaved reads -> decode -> optional in-memory cache ->
shuffle of volumes -> repeat -> `samples_per_volume` augmented patches per loaded volume in one
vectorised call -> shuffle of patches -> batch -> prefetch. Parallelism is AUTOTUNE'd. Patch draw
number i uses the stateless seed (params.seed, i), so with `sampling.deterministic` the same params
give the same batches.
"""
import tensorflow as tf

from medseg_dl.data.tfrecords import decode_example, record_dataset
from medseg_dl.errors import DataError, ParamsError
from medseg_dl.pipeline import augment, sampling

AUTOTUNE = tf.data.AUTOTUNE


def patch_size_of(params):
    """The patch size (3 positive ints, voxels) from `sampling.patch_size`; `ParamsError` otherwise."""
    size = params.sampling.patch_size
    if not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in size):
        raise ParamsError(f"sampling.patch_size = {size!r}: expected 3 positive integers (voxels)")
    return list(size)


def bucketed_flat(volume, padding):
    """The volume's image (L, C) float32 and label (L,) int32 as the flat samplers read them
    (augment.flatten_padded), zero-padded to L = the next of 2 steps per octave, and its spatial shape
    (3,) int32. The compiled sampler then meets few distinct shapes (one XLA compilation each) at
    < 50 % extra memory for this transient copy."""
    flat_image, shape_vox = augment.flatten_padded(volume["image"], padding)
    flat_label, _ = augment.flatten_padded(volume["label"], padding)
    length = tf.shape(flat_label)[0]
    octave = tf.math.floor(tf.math.log(tf.cast(length, tf.float32)) / tf.math.log(2.0))
    step = tf.cast(2.0 ** tf.maximum(octave - 1.0, 0.0), tf.int32)
    extra = (length + step - 1) // step * step - length
    return tf.pad(flat_image, [[0, extra], [0, 0]]), tf.pad(flat_label, [[0, extra]]), shape_vox


def patch_function(params):
    """A function (volume dict, middles (S, 3) float32, seed (2,) int64) -> (images (S, px, py, pz, C)
    float32, labels (S, px, py, pz) int32): random parameters drawn with plain TF ops, then sampling
    grid, sampling and intensity augmentation (params.augmentation, params.sampling.padding), each one
    XLA-compiled call; only the sampling call compiles once per bucket of volume sizes."""
    size, aug, padding = patch_size_of(params), params.augmentation, params.sampling.padding
    image_sampler = augment.sample_linear_flat if augment.spatial_enabled(aug) else augment.sample_nearest_flat

    @tf.function(jit_compile=True)
    def coordinates(middles, spatial):
        return augment.spatial_coordinates(middles, size, spatial)

    @tf.function(jit_compile=True)
    def sample(flat_image, flat_label, shape_vox, coords):
        return (image_sampler(flat_image, shape_vox, coords, padding),
                augment.sample_nearest_flat(flat_label, shape_vox, coords, padding))

    @tf.function(jit_compile=True)
    def intensity(images, drawn):
        return augment.apply_intensity(images, aug, drawn)

    def patches(volume, middles, seed):
        spatial = augment.draw_spatial(aug, middles.shape[0], tf.random.experimental.stateless_fold_in(seed, 0))
        images, labels = sample(*bucketed_flat(volume, padding), coordinates(middles, spatial))
        if augment.intensity_enabled(aug):
            drawn = augment.draw_intensity(aug, tf.shape(images), tf.random.experimental.stateless_fold_in(seed, 1))
            images = intensity(images, drawn)
        return images, labels

    return patches


def volume_patches(volume, params, seed, make_patches=None):
    """`samples_per_volume` augmented patches of one decoded volume dict (data/tfrecords.py) as a dict:
    image (S, px, py, pz, C) float32, label (S, px, py, pz) int32, position (S, 3) float32 (centre
    voxel / (shape - 1), see sampling.py), subject (S,) string. seed: (2,) int64 stateless seed of this draw;
    make_patches: the `patch_function(params)` to reuse (built when None)."""
    size = patch_size_of(params)
    count = params.sampling.samples_per_volume
    make_patches = make_patches or patch_function(params)
    centres = sampling.patch_centres(volume, params.sampling, count,
                                     tf.random.experimental.stateless_fold_in(seed, 0))
    middles = sampling.patch_middles(centres, size)
    image, label = make_patches(volume, middles, tf.random.experimental.stateless_fold_in(seed, 1))
    channels = volume["image"].shape[-1]
    return {"image": tf.ensure_shape(image, [count, *size, channels]),
            "label": tf.ensure_shape(label, [count, *size]),
            "position": sampling.normalized_positions(centres, volume["shape"]),
            "subject": tf.fill([count], volume["subject"])}


def patch_dataset(volumes, params, seed=None):
    """Batches of augmented patches from a dataset of decoded volume dicts (at least image (X,Y,Z,C)
    float32, label (X,Y,Z) int32, shape (3,) int32, class_locations, class_location_counts, subject).

    Yields dicts: image (N, px, py, pz, C) float32, label (N, px, py, pz) int32, position (N, 3)
    float32, subject (N,) string, N = sampling.batch_size; ends when `volumes` ends (after the last
    full batch). seed: int, default params.seed."""
    seed = params.seed if seed is None else seed
    sampling_params = params.sampling
    deterministic = sampling_params.deterministic

    make_patches = patch_function(params)

    def draw(index, volume):
        return volume_patches(volume, params, tf.stack([tf.constant(seed, tf.int64), index]), make_patches)

    patches = volumes.enumerate().map(draw, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    patches = patches.unbatch()
    if sampling_params.patch_shuffle_buffer > 1:
        patches = patches.shuffle(sampling_params.patch_shuffle_buffer, seed=seed)
    patches = patches.batch(sampling_params.batch_size, drop_remainder=True)
    return patches.prefetch(AUTOTUNE).with_options(_options(deterministic))


def train_inputs(params, files):
    """Endless training batches (see `patch_dataset`) from TFRecord `files` (list of paths, one
    subject each; GZIP per data.gzip)."""
    files = [str(f) for f in files]
    if not files:
        raise DataError("train_inputs: no TFRecord files given; check the training file list "
                        "(<model_dir>/filelists/train.json) and run `medseg convert`")
    sampling_params = params.sampling
    deterministic = sampling_params.deterministic
    volumes = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=params.seed)
    volumes = volumes.interleave(lambda path: record_dataset(path, params.data.gzip), cycle_length=AUTOTUNE,
                                 num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    volumes = volumes.map(lambda record: decode_example(record, len(params.data.channels)),
                          num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if sampling_params.cache:
        volumes = volumes.cache()
    volumes = volumes.shuffle(sampling_params.shuffle_buffer, seed=params.seed).repeat()
    return patch_dataset(volumes, params)


def volume_inputs(params, files):
    """Whole decoded volumes (dicts of data/tfrecords.py `decode_example`), one at a time, in the
    order of `files`, without augmentation: the evaluation metrics pipeline."""
    files = [str(f) for f in files]
    if not files:
        raise DataError("volume_inputs: no TFRecord files given; check the evaluation file list")
    volumes = record_dataset(files, params.data.gzip)
    volumes = volumes.map(lambda record: decode_example(record, len(params.data.channels)),
                          num_parallel_calls=AUTOTUNE, deterministic=True)
    return volumes.prefetch(1)


def _options(deterministic):
    options = tf.data.Options()
    options.deterministic = deterministic
    return options
