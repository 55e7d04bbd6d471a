"""Spatial augmentation in TF ops: flip, rotation, scale and elastic displacement composed into one
sampling grid per patch, and the samplers that read the volume there.

Spatial transforms never warp a whole volume. For S patches of one volume they build the
patches' voxel grid (S, px, py, pz, 3), centred at 0, map it through one 3x3 matrix per patch
(flip, rotation, scale), add a smooth elastic displacement, add the patch middle, and sample
the volume once there: linearly for all image channels, nearest for labels. Coordinates outside
the volume are padded ("constant": image 0, label 0; "edge": the nearest voxel).

The transforms are physical: they act in mm space, on the volume's voxel spacing s (3,) mm (the
model grid may be anisotropic, e.g. 0.7 x 0.7 x 5 mm). A sampling matrix M maps an output offset o
(mm from the patch middle) to the input offset M o (mm), so out(o) = in(middle + M o + d(o)); on
voxel offsets the matrix is S^-1 M S with S = diag(s), and the elastic displacement d (mm) is d / s
voxels. Angles about axis x, y, z turn the content from y toward z, z toward x and x toward y;
+90 degrees about z equals `np.rot90(patch, 1, axes=(0, 1))` where x and y have the same spacing.
A scale factor > 1 enlarges the content. With s = 1 mm on every axis, mm and voxels coincide.
Random parameters come from the named streams of streams.py.
"""
import numpy as np
import tensorflow as tf

from medseg_dl.pipeline.streams import ALG, stream, switch, uniform

# --- sampling grid and matrices --------------------------------------------------------------


def patch_grid(patch_size_vox):
    """(px, py, pz, 3) float32 offsets of a patch's voxels from its middle: i - (p - 1) / 2 per axis."""
    axes = [tf.range(p, dtype=tf.float32) - (p - 1) / 2 for p in patch_size_vox]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def flip_matrices(flips):
    """(S, 3, 3) float32 sampling matrices mirroring the axes where `flips` (S, 3) bool is true."""
    return tf.linalg.diag(tf.where(flips, -1.0, 1.0))


def rotation_matrices(angles_rad):
    """(S, 3, 3) float32 sampling matrices turning the content by `angles_rad` (S, 3) float32 radians
    about x, then y, then z (see the module docstring for the directions)."""
    cos, sin = tf.unstack(tf.cos(angles_rad), axis=1), tf.unstack(tf.sin(angles_rad), axis=1)
    one, zero = tf.ones_like(cos[0]), tf.zeros_like(cos[0])

    def matrix(rows):
        return tf.stack([tf.stack(row, axis=-1) for row in rows], axis=-2)

    rot_x = matrix([[one, zero, zero], [zero, cos[0], -sin[0]], [zero, sin[0], cos[0]]])
    rot_y = matrix([[cos[1], zero, sin[1]], [zero, one, zero], [-sin[1], zero, cos[1]]])
    rot_z = matrix([[cos[2], -sin[2], zero], [sin[2], cos[2], zero], [zero, zero, one]])
    content = rot_z @ rot_y @ rot_x
    return tf.linalg.matrix_transpose(content)  # sampling matrix = inverse of the content rotation


def scale_matrices(factors):
    """(S, 3, 3) float32 sampling matrices enlarging the content by `factors` (S, 3) float32 per axis."""
    return tf.linalg.diag(1.0 / factors)


def voxel_matrices(matrices, spacing_mm):
    """(S, 3, 3) float32 sampling matrices on voxel offsets, S^-1 M S with S = diag(spacing_mm), of the
    mm-space sampling matrices `matrices` (S, 3, 3) float32; spacing_mm (3,) float32 voxel size in mm."""
    return matrices * spacing_mm[None, None, :] / spacing_mm[None, :, None]


def sampling_coordinates(middles, patch_size_vox, matrices=None, displacement=None):
    """(S, px, py, pz, 3) float32 volume voxel coordinates to sample: middle + M o + d(o).

    middles (S, 3) float32 patch middles in voxels; matrices (S, 3, 3) float32 or None (identity);
    displacement (S, px, py, pz, 3) float32 voxels or None (zero)."""
    if matrices is None:
        coords = patch_grid(patch_size_vox)[None]
    else:  # M o = x M[:, :, 0] + y M[:, :, 1] + z M[:, :, 2]: three broadcast terms
        axes = [tf.range(p, dtype=tf.float32) - (p - 1) / 2 for p in patch_size_vox]
        columns = tf.unstack(matrices, axis=2)
        coords = (axes[0][None, :, None, None, None] * columns[0][:, None, None, None, :]
                  + axes[1][None, None, :, None, None] * columns[1][:, None, None, None, :]
                  + axes[2][None, None, None, :, None] * columns[2][:, None, None, None, :])
    if displacement is not None:
        coords = coords + displacement
    return coords + middles[:, None, None, None, :]


# --- elastic displacement ----------------------------------------------------------------------


def _upsample_matrix(points, size):
    """(size, points) float32 linear interpolation from `points` control points spanning `size` voxels."""
    position = np.linspace(0.0, points - 1.0, size) if size > 1 else np.zeros(1)
    low = np.minimum(np.floor(position).astype(int), points - 2)
    frac = position - low
    matrix = np.zeros((size, points), np.float32)
    matrix[np.arange(size), low] = 1.0 - frac
    matrix[np.arange(size), low + 1] = frac
    return matrix


def _gaussian_matrices(sigma, points):
    """(S, points, points) float32 row-normalised Gaussian smoothing with `sigma` (S,) in grid units."""
    index = tf.range(points, dtype=tf.float32)
    distance2 = tf.square(index[:, None] - index[None, :])
    sigma = tf.maximum(sigma, 1e-3)[:, None, None]
    weights = tf.exp(-distance2 / (2.0 * tf.square(sigma)))
    return weights / tf.reduce_sum(weights, axis=-1, keepdims=True)


def elastic_displacement(control, sigma_mm, magnitude_mm, patch_size_vox, spacing_mm):
    """(S, px, py, pz, 3) float32 smooth displacements in voxels: a field in mm with RMS `magnitude_mm`
    (S,) per patch (over all voxels and the 3 components; 0 gives exactly 0), divided by `spacing_mm`
    (3,) float32 (the voxel size in mm) per component.

    control (S, g, g, g, 3) float32: displacements at g^3 control points spanning the patch (standard
    normal for a random field). They are smoothed by a Gaussian of `sigma_mm` (S,) mm (in grid units,
    per axis: sigma_mm / spacing_mm / control spacing in voxels) and interpolated linearly to the patch;
    smoothing and interpolation are one (p, g) matrix per axis, so the cost is that of one small matmul."""
    count, grid_points = tf.shape(control)[0], control.shape[1]
    axes = []
    for axis, size in enumerate(patch_size_vox):
        control_spacing_vox = max(size - 1, 1) / (grid_points - 1)
        smoothing = _gaussian_matrices(sigma_mm / spacing_mm[axis] / control_spacing_vox, grid_points)
        axes.append(tf.linalg.matmul(_upsample_matrix(grid_points, size), smoothing))
    along_z = tf.einsum("scl,sijlk->sijck", axes[2], control)
    along_yz = tf.einsum("sbj,sijck->sibck", axes[1], along_z)
    rest = tf.reshape(along_yz, [count, grid_points, -1])  # (S, g, py * pz * 3)
    # RMS of axes[0] @ rest without forming it: sum of squares = <A^T A, rest rest^T>
    sum_squares = tf.reduce_sum((tf.linalg.matrix_transpose(axes[0]) @ axes[0]) *
                                (rest @ tf.linalg.matrix_transpose(rest)), axis=[1, 2])
    rms = tf.sqrt(sum_squares / float(np.prod(patch_size_vox) * 3))
    gain = magnitude_mm / tf.maximum(rms, 1e-12)
    field_mm = (axes[0] * gain[:, None, None]) @ rest
    return tf.reshape(field_mm, [count, *patch_size_vox, 3]) / spacing_mm


# --- sampling the volume -------------------------------------------------------------------------


def pad_border(volume, padding):
    """`volume` (X, Y, Z, ...) with a one-voxel border: (X+2, Y+2, Z+2, ...), the border 0 for
    padding "constant" or a copy of the edge voxels for "edge". The samplers read padded volumes."""
    pads = [[1, 1]] * 3 + [[0, 0]] * (volume.shape.rank - 3)
    return tf.pad(volume, pads, mode="CONSTANT" if padding == "constant" else "SYMMETRIC")


def flatten_padded(volume, padding):
    """(flat, shape_vox) for the `*_flat` samplers: `pad_border(volume)` reshaped to ((X+2)(Y+2)(Z+2), ...)
    in C order, and the unpadded spatial shape (3,) int32."""
    volume = tf.convert_to_tensor(volume)
    shape = tf.shape(volume)
    padded = pad_border(volume, padding)
    return tf.reshape(padded, tf.concat([[-1], shape[3:]], 0)), shape[:3]


def _clamp(coords, shape_vox, padding):
    """Coordinates moved into the region the padded volume answers: [-1, n] per axis for "constant"
    (beyond it the border's 0 holds), [0, n - 1] for "edge"."""
    size = tf.cast(shape_vox, tf.float32)
    if padding == "constant":
        return tf.clip_by_value(coords, -1.0, size)
    return tf.clip_by_value(coords, 0.0, size - 1.0)


def _flat_index(index, shape_vox):
    """Flat index into the border-padded volume of padded-grid indices `index` (..., 3) int32."""
    return (index[..., 0] * (shape_vox[1] + 2) + index[..., 1]) * (shape_vox[2] + 2) + index[..., 2]


def sample_linear_flat(flat, shape_vox, coords, padding):
    """Trilinear samples, all channels at once, at `coords` (..., 3) float32 voxel coordinates of the
    unpadded volume: (..., C) float32. flat (L, C) float32: the border-padded volume in C order
    (`flatten_padded`), possibly followed by unused rows; shape_vox (3,) int32: the unpadded (X, Y, Z).
    At integer coordinates the result is the voxel exactly (weights 0 and 1)."""
    clamped = _clamp(coords, shape_vox, padding)
    lower = tf.clip_by_value(tf.floor(clamped), -1.0, tf.cast(shape_vox, tf.float32) - 1.0)
    frac = tf.unstack((clamped - lower)[..., None], axis=-2)  # 3 x (..., 1)
    base = _flat_index(tf.cast(lower, tf.int32) + 1, shape_vox)
    step_y, step_x = shape_vox[2] + 2, (shape_vox[1] + 2) * (shape_vox[2] + 2)

    def lerp(low, high, weight):
        return low + weight * (high - low)

    def along_z(offset):
        return lerp(tf.gather(flat, base + offset), tf.gather(flat, base + offset + 1), frac[2])

    def along_yz(offset):
        return lerp(along_z(offset), along_z(offset + step_y), frac[1])

    return lerp(along_yz(0), along_yz(step_x), frac[0])


def sample_nearest_flat(flat, shape_vox, coords, padding):
    """Nearest-voxel samples (halves round up) at `coords` (..., 3) float32 voxel coordinates of the
    unpadded volume: (...) or (..., C), flat's dtype. flat (L,) or (L, C), any dtype: the border-padded
    volume in C order (`flatten_padded`); shape_vox (3,) int32: the unpadded (X, Y, Z)."""
    index = tf.cast(tf.floor(_clamp(coords, shape_vox, padding) + 0.5), tf.int32) + 1
    return tf.gather(flat, _flat_index(index, shape_vox))


# --- random spatial parameters --------------------------------------------------------------------


def random_flips(aug, count, seed):
    """(S, 3) bool: the axes each of `count` patches is mirrored on (flip.p per allowed axis).
    aug: the `augmentation` params section."""
    allowed = tf.constant([axis in aug.flip.axes for axis in range(3)])
    return (tf.random.stateless_uniform([count, 3], stream(seed, "flip"), alg=ALG) < aug.flip.p) & allowed


def random_matrices(aug, count, seed, flips=None):
    """(S, 3, 3) float32 random flip @ rotation @ scale sampling matrices in mm space, or None when flip,
    rotate and scale all have p = 0. aug: the `augmentation` params section; flips (S, 3) bool
    (`random_flips`), given when flip.p > 0."""
    if aug.flip.p == 0 and aug.rotate.p == 0 and aug.scale.p == 0:
        return None
    matrices = tf.eye(3, batch_shape=[count])
    if flips is not None:
        matrices = flip_matrices(flips)
    if aug.rotate.p > 0:
        limit = np.deg2rad(np.asarray(aug.rotate.max_deg, np.float32))
        angles = uniform(seed, "rotate_angle", [count, 3], (-1.0, 1.0)) * limit
        on = switch(seed, "rotate", count, aug.rotate.p)
        matrices = matrices @ rotation_matrices(tf.where(on[:, None], angles, 0.0))
    if aug.scale.p > 0:
        factors = uniform(seed, "scale_factor", [count, 3 if aug.scale.anisotropic else 1], aug.scale.range)
        on = switch(seed, "scale", count, aug.scale.p)
        matrices = matrices @ scale_matrices(tf.where(on[:, None], factors * tf.ones([1, 3]), 1.0))
    return matrices


def spatial_enabled(aug):
    """Whether any spatial transform (flip, rotate, scale, elastic) has p > 0."""
    return any(aug[name].p > 0 for name in ("flip", "rotate", "scale", "elastic"))


def draw_spatial(aug, count, seed):
    """Random spatial parameters of `count` patches as a dict: "flips" (S, 3) bool (the mirrored axes)
    when flip.p > 0; "matrices" (S, 3, 3) float32 mm-space sampling matrices when flip, rotate or scale
    has p > 0; "elastic_control" (S, g, g, g, 3), "elastic_sigma_mm" (S,) and "elastic_magnitude_mm"
    (S,) float32 (0 for patches not switched on) when elastic.p > 0."""
    drawn = {}
    if aug.flip.p > 0:
        drawn["flips"] = random_flips(aug, count, seed)
    matrices = random_matrices(aug, count, seed, drawn.get("flips"))
    if matrices is not None:
        drawn["matrices"] = matrices
    elastic = aug.elastic
    if elastic.p > 0:
        points = elastic.grid_points
        drawn["elastic_control"] = tf.random.stateless_normal([count, points, points, points, 3],
                                                              stream(seed, "elastic_control"), alg=ALG)
        drawn["elastic_sigma_mm"] = uniform(seed, "elastic_sigma", [count], elastic.sigma_mm)
        magnitude = uniform(seed, "elastic_magnitude", [count], elastic.magnitude_mm)
        drawn["elastic_magnitude_mm"] = tf.where(switch(seed, "elastic", count, elastic.p), magnitude, 0.0)
    return drawn


def spatial_coordinates(middles, patch_size_vox, drawn, spacing_mm):
    """(S, px, py, pz, 3) float32 volume coordinates (voxels) of patches around `middles` (S, 3) float32
    voxels under the spatial parameters `drawn` (see `draw_spatial`; {} gives the plain crop's integer
    grid), applied in mm space on voxels of `spacing_mm` (3,) float32 mm."""
    displacement = None
    if "elastic_control" in drawn:
        displacement = elastic_displacement(drawn["elastic_control"], drawn["elastic_sigma_mm"],
                                            drawn["elastic_magnitude_mm"], patch_size_vox, spacing_mm)
    matrices = drawn.get("matrices")
    if matrices is not None:
        matrices = voxel_matrices(matrices, spacing_mm)
    return sampling_coordinates(middles, patch_size_vox, matrices, displacement)
