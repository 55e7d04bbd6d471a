"""Sliding-window geometry (medseg_dl.inference.windows): starts, padding, weights, positions (the
training patches' rule), recombination."""
import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.config.params import Params
from medseg_dl.inference import windows
from medseg_dl.pipeline import inputs


def identity(windows, positions):
    return windows


FINISH_AVERAGE = windows.make_finisher()


def recombine(predict_batch, volume, grid, batch_size, num_outputs, axis=2, finish=FINISH_AVERAGE, **options):
    """Weighted average (X, Y, Z, K) of the window outputs of `predict_batch` over `volume`, assembled from
    the slabs along `axis`, each checked to follow the previous one."""
    result = np.full(volume.shape[:3] + (num_outputs,), np.nan, np.float32)
    expected_begin = 0
    for begin, sums, coverages in windows.recombined_slabs(predict_batch, volume, grid, batch_size, num_outputs,
                                                           axis, **options):
        assert begin == expected_begin
        index = [slice(None)] * 3
        index[axis] = slice(begin, begin + sums.shape[axis])
        result[tuple(index)] = windows.finish_block(finish, sums, coverages, np.empty(sums.shape, np.float32))
        expected_begin += sums.shape[axis]
    assert expected_begin == volume.shape[axis]
    return result


def reference_average(predict_batch, volume, grid):
    """The weighted average (X, Y, Z, K) float64 of the window outputs, window by window over a whole padded
    accumulator: the exact reference of the slab-wise recombination."""
    padded = windows.pad_volume(volume, grid)
    weights = windows.importance_map(grid.patch_size_vox, grid.blending)[..., None].astype(np.float64)
    sums, weight_sum = None, np.zeros(padded.shape[:3] + (1,))
    for (x, y, z), position in zip(grid.starts_vox, grid.positions):
        px, py, pz = grid.patch_size_vox
        output = np.asarray(predict_batch(padded[None, x:x + px, y:y + py, z:z + pz], position[None]))[0]
        sums = np.zeros(padded.shape[:3] + output.shape[-1:]) if sums is None else sums
        sums[x:x + px, y:y + py, z:z + pz] += output * weights
        weight_sum[x:x + px, y:y + py, z:z + pz] += weights
    return (sums / weight_sum)[grid.original_region()]


@pytest.mark.parametrize("size, window, overlap, expected", [
    (240, 96, 0.5, [0, 48, 96, 144]),
    (155, 96, 0.5, [0, 30, 59]),        # linspace(0, 59, 3) = 0, 29.5, 59; numpy rounds half to even
    (96, 96, 0.5, [0]),
    (50, 20, 0.0, [0, 15, 30]),
    (40, 20, 0.0, [0, 20]),
    (41, 20, 0.25, [0, 10, 21]),        # step 15: ceil(21 / 15) + 1 = 3 windows
])
def test_window_starts_examples(size, window, overlap, expected):
    assert windows.window_starts(size, window, overlap).tolist() == expected


@pytest.mark.parametrize("window", [1, 7, 16, 32])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_window_starts_cover_the_axis_with_the_fewest_windows(window, overlap):
    step = window * (1 - overlap)
    for size in range(window, window + 70):
        starts = windows.window_starts(size, window, overlap)
        assert starts[0] == 0 and starts[-1] == size - window  # the last window touches the border
        covered = np.zeros(size, bool)
        for start in starts:
            covered[start:start + window] = True
        assert covered.all()
        assert np.all(np.diff(starts) > 0) and np.all(np.diff(starts) <= np.floor(step) + 1)
        if len(starts) >= 3:  # one window fewer would need a step larger than P * (1 - overlap)
            assert (size - window) / (len(starts) - 2) > step


def test_bad_windowing_arguments_are_value_errors_naming_the_argument():
    """Library code names its argument and the rule (the params key's, schema.check_argument), not a key."""
    with pytest.raises(ValueError, match=r"^overlap = 1\.0: must be <= 0\.95$"):
        windows.window_starts(50, 20, 1.0)
    with pytest.raises(ValueError, match=r"^blending = 'hann': expected one of \['gaussian', 'constant'\]"):
        windows.importance_map((8, 8, 8), "hann")


def test_padding_to_window_is_symmetric_and_only_where_needed():
    padding = windows.padding_to_window((30, 100, 95), (40, 96, 96))
    assert padding.tolist() == [[5, 5], [0, 0], [0, 1]]


def test_gaussian_profile_has_sigma_one_eighth_of_the_window():
    profile = windows.importance_profile(97, "gaussian")  # odd: the centre is voxel 48
    sigma = 97 / 8
    offsets = np.arange(-48, 49)
    expected = np.maximum(np.exp(-0.5 * (offsets / sigma) ** 2), 1e-3)
    np.testing.assert_allclose(profile, expected, rtol=1e-6)


@pytest.mark.parametrize("patch", [(16, 24, 9), (96, 96, 96), (5, 1, 2)])
def test_importance_map_shape_symmetry_max_and_min(patch):
    weights = windows.importance_map(patch, "gaussian")
    assert weights.shape == patch and weights.dtype == np.float32
    for axis in range(3):
        np.testing.assert_array_equal(weights, np.flip(weights, axis))
    assert weights.max() == pytest.approx(1.0)
    assert weights.min() > 0
    centre = tuple(p // 2 for p in patch)
    assert weights[centre] == weights.max()
    np.testing.assert_array_equal(windows.importance_map(patch, "constant"), np.ones(patch, np.float32))


def test_grid_positions_are_window_centres_in_the_original_volume():
    grid = windows.window_grid((50, 40, 10), (20, 20, 20), 0.0, "constant")
    assert grid.padding_vox.tolist() == [[0, 0], [0, 0], [5, 5]]
    expected_starts = [(x, y, 0) for x in (0, 15, 30) for y in (0, 20)]
    assert [tuple(s) for s in grid.starts_vox] == expected_starts
    for (x, y, _), position in zip(expected_starts, grid.positions):
        # centre = start + 9.5 in the original volume; the z window spans the padded axis: 0 - 5 + 9.5 = 4.5
        np.testing.assert_allclose(position, [(x + 9.5) / 49, (y + 9.5) / 39, 4.5 / 9], rtol=1e-6)
    assert grid.positions.dtype == np.float32


@pytest.mark.parametrize("shape, size", [((20, 17, 9), (6, 8, 4)), ((4, 9, 5), (6, 5, 8)), ((11, 11, 11), (5, 5, 5))])
def test_a_training_patch_and_a_window_at_the_same_start_get_the_same_position(shape, size):
    """MedPatchNet's position: the training pipeline's patch that starts at a voxel and the inference
    window that starts there get the same position (even sizes, and volumes smaller than the window)."""
    grid = windows.window_grid(shape, size, 0.5, "constant")
    params = Params.from_dict({"data": {"num_classes": 2}, "sampling": {
        "patch_size": list(size), "batch_size": 1, "samples_per_volume": 1, "class_probabilities": [0.0, 1.0]}})
    for padded_start, window_position in zip(grid.starts_vox, grid.positions):
        centre = padded_start - grid.padding_vox[:, 0] + np.array(size) // 2  # the patch starting there
        label = np.zeros(shape, np.int32)
        label[tuple(centre)] = 1  # the only location of class 1: every training patch is centred on it
        volume = inputs.prepare_volume({"image": np.zeros(shape + (1,), np.float32), "label": label,
                                        "spacing_mm": np.ones(3, np.float32),
                                        "class_locations": centre[None].astype(np.int32),
                                        "class_location_counts": np.array([0, 1], np.int32),
                                        "class_voxels": np.array([0, 1], np.int64), "subject": "s"},
                                       "constant")
        patch = inputs.volume_patches(volume, params, tf.constant([0, 1], tf.int64))
        np.testing.assert_array_equal(patch["position"].numpy()[0], window_position)


@pytest.mark.parametrize("shape", [(23, 17, 9), (16, 16, 16), (5, 30, 12), (33, 8, 40)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("blending", ["gaussian", "constant"])
def test_identity_windows_recombine_to_the_input(shape, overlap, blending):
    volume = np.random.default_rng(0).normal(size=shape + (2,)).astype(np.float32)
    grid = windows.window_grid(shape, (16, 12, 10), overlap, blending)
    result = recombine(identity, volume, grid, batch_size=3, num_outputs=2)
    assert result.shape == volume.shape and result.dtype == np.float32
    np.testing.assert_allclose(result, volume, rtol=2e-6, atol=2e-6)


def test_constant_blending_without_overlap_recombines_exactly():
    volume = np.random.default_rng(1).normal(size=(32, 24, 20, 1)).astype(np.float32)
    grid = windows.window_grid(volume.shape[:3], (16, 12, 10), 0.0, "constant")
    np.testing.assert_array_equal(recombine(identity, volume, grid, 4, 1), volume)


def test_accumulated_weight_equals_the_separable_coverage():
    """The weights summed window by window equal the outer product of the per-axis coverages."""
    shape = (30, 21, 14)
    grid = windows.window_grid(shape, (12, 10, 8), 0.5, "gaussian")
    sums = np.zeros(shape)
    for begin, block, _ in windows.recombined_slabs(lambda windows, positions: np.ones(tuple(windows.shape[:4]) + (1,),
                                                                                      np.float32),
                                                    np.zeros(shape + (1,), np.float32), grid, 5, 1, axis=0):
        sums[begin:begin + len(block)] = block[..., 0]
    weights = windows.importance_map(grid.patch_size_vox, "gaussian")
    reference = np.zeros(shape)
    for x, y, z in grid.starts_vox:
        reference[x:x + 12, y:y + 10, z:z + 8] += weights
    np.testing.assert_allclose(sums, reference, rtol=1e-5)
    cx, cy, cz = grid.coverage
    np.testing.assert_allclose(cx[:, None, None] * cy[None, :, None] * cz[None, None, :], reference, rtol=1e-5)
    assert reference.min() > 0  # every voxel is covered


def test_window_function_receives_its_window_position():
    """Without overlap each voxel shows the position of the one window that covers it."""
    shape = (40, 20, 8)  # x: two windows; z: smaller than the window, padded
    grid = windows.window_grid(shape, (20, 20, 20), 0.0, "constant")

    def positions_as_output(windows, positions):
        return np.broadcast_to(np.asarray(positions)[:, None, None, None, :], tuple(windows.shape[:4]) + (3,))

    result = recombine(positions_as_output, np.zeros(shape + (1,), np.float32), grid, 2, 3)
    x = np.arange(40)
    np.testing.assert_allclose(result[:, 0, 0, 0], (20 * (x // 20) + 9.5) / 39, rtol=1e-6)
    np.testing.assert_allclose(result[..., 1], 9.5 / 19, rtol=1e-6)
    np.testing.assert_allclose(result[..., 2], 0.5, rtol=1e-6)  # padded window: (0 - 6 + 9.5) / 7


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_threaded_add_equals_a_sequential_loop_bit_for_bit(monkeypatch, threads):
    """Windows of one batch that overlap along x (the slabs' borders cut through them) and a small weighting
    buffer (several row chunks per window): each voxel gets the same additions in the same order."""
    monkeypatch.setattr(windows, "THREADS", threads)
    monkeypatch.setattr(windows, "CACHE_VALUES", 3 * 7 * 6 * 2)  # 3 rows per chunk
    rng = np.random.default_rng(4)
    outputs = rng.normal(size=(5, 10, 7, 6, 2)).astype(np.float32)
    starts_vox = np.array([[0, 0, 0], [5, 0, 0], [3, 2, 1], [8, 1, 0], [5, 0, 0]])
    weights = windows.importance_map((10, 7, 6), "gaussian")[..., None]
    for weight in (None, weights):
        accumulator = rng.normal(size=(18, 9, 7, 2)).astype(np.float32)
        reference = accumulator.copy()
        for output, (x, y, z) in zip(outputs, starts_vox):
            reference[x:x + 10, y:y + 7, z:z + 6] += output if weight is None else output * weight
        windows.add_windows(accumulator, outputs, starts_vox, weight)
        np.testing.assert_array_equal(accumulator, reference)


def nonlinear_windows(windows, positions):
    """Window outputs (N, px, py, pz, 3) that differ between overlapping windows: the voxels, their squares and
    the window position's x (so a slab taken from the wrong window or offset by one shows)."""
    windows = np.asarray(windows)
    x = np.broadcast_to(np.asarray(positions)[:, None, None, None, :1], windows.shape[:4] + (1,))
    return np.concatenate([windows[..., :1], windows[..., :1] ** 2, x], -1).astype(np.float32)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("shape, overlap", [((37, 29, 23), 0.5), ((9, 31, 26), 0.25), ((40, 24, 20), 0.0)])
@pytest.mark.parametrize("blending", ["gaussian", "constant"])
def test_slabs_along_any_axis_equal_the_whole_volume_reference(axis, shape, overlap, blending):
    """Slab by slab along each axis (a volume smaller than the window on one axis, batches that do not divide
    a row) equals the window-by-window average over a whole accumulator."""
    volume = np.random.default_rng(2).normal(size=shape + (1,)).astype(np.float32)
    grid = windows.window_grid(shape, (16, 12, 10), overlap, blending)
    result = recombine(nonlinear_windows, volume, grid, 3, 3, axis=axis)
    np.testing.assert_allclose(result, reference_average(nonlinear_windows, volume, grid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 2])
def test_normalized_half_precision_sums_hold_the_average_within_float16_rounding(axis):
    """With `normalized` the outputs arrive weighted by their share of each voxel's weight, so float16 sums are
    the average itself (no tiny Gaussian corner weights to underflow), within float16 rounding."""
    shape = (37, 29, 23)
    volume = np.random.default_rng(3).normal(size=shape + (1,)).astype(np.float32)
    grid = windows.window_grid(shape, (16, 12, 10), 0.5, "gaussian")

    def shared(cut, positions, profile_x, profile_y, profile_z):
        share = profile_x[:, :, None, None] * profile_y[:, None, :, None] * profile_z[:, None, None, :]
        return (nonlinear_windows(cut, positions) * share[..., None]).astype(np.float16)

    result = recombine(shared, volume, grid, 4, 3, axis=axis, finish=windows.make_finisher(dtype=tf.float16),
                       dtype=np.float16, normalized=True)
    reference = reference_average(nonlinear_windows, volume, grid)
    np.testing.assert_allclose(result, reference, rtol=4e-3, atol=4e-3)


def test_a_slab_is_yielded_as_soon_as_its_row_of_windows_is_done():
    """The live sums span one row of windows: the first slab comes after the first row's batches only, each
    later slab after one more row, and the live array is one window thick along the slab axis."""
    shape = (20, 18, 40)
    grid = windows.window_grid(shape, (8, 8, 10), 0.5, "constant")
    rows = windows.window_rows(grid, 2)
    calls, seen = [], []

    def counting(cut, positions):
        calls.append(len(positions))
        return np.asarray(cut)

    for begin, sums, _ in windows.recombined_slabs(counting, np.zeros(shape + (1,), np.float32), grid, 4, 1, axis=2):
        seen.append((begin, sum(calls)))
        assert sums.base is not None and sums.base.shape[2] == 10  # a view of the one-window-thick live sums
    row_windows = np.cumsum([len(indices) for _, _, indices in rows])
    assert [windows_done for _, windows_done in seen] == row_windows.tolist()
    assert [begin for begin, _ in seen] == [start for start, _, _ in rows]
