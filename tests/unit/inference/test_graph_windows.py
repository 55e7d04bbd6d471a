"""The in-graph recombination slab by slab along x (graph_windows.py) against an exact float64 reference: the
grid, padding, positions, weights and window order of windows.py, one row of windows live at a time, and the
float16 accumulation within 1e-3 of the probabilities with the labels of float32 accumulation."""
import numpy as np
import pytest
import tensorflow as tf

from medseg_dl.inference import graph_windows, windows
from medseg_dl.inference.windows import window_starts

PATCH = (16, 12, 16)
NUM_CHANNELS, NUM_CLASSES = 2, 4
SOFTMAX = lambda average: tf.nn.softmax(average, axis=-1)  # noqa: E731
ARGMAX = lambda average: tf.argmax(average, axis=-1, output_type=tf.int32)  # noqa: E731
SIGMOID = tf.sigmoid  # one per region (data.regions): not shift-invariant
# (shape, overlap, blending, batch_size): windows per row (y starts x z starts) 4x2 = 8 at overlap 0.5,
# 3x2 = 6 at 0.25, 2x2 = 4 at 0 (the 11 and 9 voxel axes are padded to one window)
CASES = [((37, 29, 23), 0.5, "gaussian", 3),   # 3 does not divide a row of 8
         ((37, 29, 23), 0.25, "constant", 2),  # 2 divides a row of 6
         ((37, 9, 23), 0.33, "gaussian", 4),   # y smaller than the window
         ((11, 29, 23), 0.5, "gaussian", 5),   # x smaller than the window: one row, cropped in x
         ((40, 24, 32), 0.0, "constant", 16),  # no overlap, a batch longer than the row
         ((37, 29, 23), 0.6, "gaussian", 8)]   # a row of 5 x 3 = 15 windows: 8 + 7


def realistic_network(seed=0):
    """A window function (windows (N, px, py, pz, C), positions (N, 3)) -> logits (N, px, py, pz, K) float32 in
    [-20, 20]: a fixed random 1x1x1 convolution of the image, plus a term of the window position and a fixed
    field over the window (so overlapping windows disagree, as a network's do). Elementwise only, so a window's
    logits do not depend on the batch it comes in."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(0.0, 4.0, (NUM_CHANNELS, NUM_CLASSES)).astype(np.float32)
    position_weights = rng.normal(0.0, 3.0, (3, NUM_CLASSES)).astype(np.float32)
    field = rng.normal(0.0, 1.0, PATCH + (NUM_CLASSES,)).astype(np.float32)

    def network(cut, positions):
        logits = field + cut[..., :1] * mixing[0]
        for c in range(1, NUM_CHANNELS):
            logits += cut[..., c:c + 1] * mixing[c]
        for a in range(3):
            logits += positions[:, a, None, None, None, None] * position_weights[a]
        return tf.clip_by_value(logits, -20.0, 20.0)

    return network


def image_of(shape, seed=1):
    """(X, Y, Z, C) float32: smooth blobs plus noise, channels correlated (as modalities are)."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(0, 3 * np.pi, s) for s in shape], indexing="ij")
    blobs = np.sin(axes[0] + 1.0) * np.cos(axes[1]) + np.sin(axes[2] * 0.7)
    channels = [blobs + rng.normal(0, 0.5, shape), 0.5 * blobs + rng.normal(0, 0.8, shape)]
    return np.stack(channels, -1).astype(np.float32)


def reference_average(network, image, overlap, blending):
    """The weighted average (X, Y, Z, K) float64 of the window logits: every window of `windows.window_grid`
    cut out of the zero-padded image, its float32 logits added in float64 with the importance map into a
    full accumulator next to a full weight sum, then divided and cropped."""
    grid = windows.window_grid(image.shape[:3], PATCH, overlap, blending)
    padded = np.pad(image, np.concatenate([grid.padding_vox, [[0, 0]]]))
    cut = np.stack([padded[x:x + PATCH[0], y:y + PATCH[1], z:z + PATCH[2]] for x, y, z in grid.starts_vox])
    logits = network(tf.constant(cut), tf.constant(grid.positions)).numpy().astype(np.float64)
    weights = windows.importance_map(PATCH, blending).astype(np.float64)
    sums = np.zeros(padded.shape[:3] + (NUM_CLASSES,))
    weight_sum = np.zeros(padded.shape[:3])
    for (x, y, z), window_logits in zip(grid.starts_vox, logits):
        region = np.s_[x:x + PATCH[0], y:y + PATCH[1], z:z + PATCH[2]]
        sums[region] += weights[..., None] * window_logits
        weight_sum[region] += weights
    original = tuple(slice(b, b + s) for b, s in zip(grid.padding_vox[:, 0], image.shape[:3]))
    return (sums / weight_sum[..., None])[original]


def softmax64(average):
    exponentials = np.exp(average - average.max(-1, keepdims=True))
    return exponentials / exponentials.sum(-1, keepdims=True)


def in_graph(network, overlap, blending, batch_size, transform, accumulation, spec_shape=(None, None, None),
             max_shift=True):
    """The traced tf.function image (X, Y, Z, C) -> recombine_in_graph(...)."""
    def recombine(image):
        return graph_windows.recombine_in_graph(network, image, PATCH, overlap, blending, batch_size, NUM_CLASSES,
                                                transform, accumulation, max_shift)

    return tf.function(recombine, input_signature=[tf.TensorSpec(tuple(spec_shape) + (NUM_CHANNELS,), tf.float32)])


@pytest.mark.parametrize("shape, overlap, blending, batch_size", CASES)
def test_float32_accumulation_equals_the_float64_reference(shape, overlap, blending, batch_size):
    network, image = realistic_network(), image_of(shape)
    reference = reference_average(network, image, overlap, blending)
    logits, probabilities, labels = (in_graph(network, overlap, blending, batch_size, transform, "float32")(image)
                                     for transform in (None, SOFTMAX, ARGMAX))
    assert logits.dtype == tf.float32 and probabilities.dtype == tf.float32 and labels.dtype == tf.int32
    assert logits.shape == probabilities.shape == shape + (NUM_CLASSES,) and labels.shape == shape
    np.testing.assert_allclose(logits.numpy(), reference, rtol=0, atol=1e-5)
    np.testing.assert_allclose(probabilities.numpy(), softmax64(reference), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(labels.numpy(), reference.argmax(-1))


@pytest.mark.parametrize("shape, overlap, blending, batch_size", CASES)
def test_float16_accumulation_keeps_probabilities_to_1e_3_and_the_labels_but_at_near_ties(shape, overlap,
                                                                                             blending, batch_size):
    """Probabilities within 1e-3 of the exact ones; labels those of float32 accumulation wherever the two largest
    class averages differ by 1e-3 or more (float16 resolves logits of 1 to 5e-4: closer ties may flip, here
    at most 1 voxel of ~25000, at gaps under 4e-4)."""
    network, image = realistic_network(seed=2), image_of(shape, seed=3)
    reference = reference_average(network, image, overlap, blending)
    assert np.abs(reference).max() > 12  # logits of a confident network: far from float16's finest values
    probabilities, labels = (in_graph(network, overlap, blending, batch_size, transform, "float16")(image)
                             for transform in (SOFTMAX, ARGMAX))
    float32_labels = in_graph(network, overlap, blending, batch_size, ARGMAX, "float32")(image).numpy()
    assert probabilities.dtype == tf.float32 and labels.dtype == tf.int32 and labels.shape == shape
    np.testing.assert_allclose(probabilities.numpy(), softmax64(reference), rtol=0, atol=1e-3)
    top_two = np.sort(reference, axis=-1)[..., -2:]
    decided = top_two[..., 1] - top_two[..., 0] >= 1e-3
    assert decided.mean() > 0.999
    np.testing.assert_array_equal(labels.numpy()[decided], float32_labels[decided])
    assert (labels.numpy() != float32_labels).sum() <= 1


@pytest.mark.parametrize("shape, overlap, blending, batch_size", CASES[:3])
def test_float16_accumulation_of_unshifted_logits_keeps_sigmoids_to_1e_3(shape, overlap, blending, batch_size):
    """A sigmoid per output (regions) is not shift-invariant: without the max shift float16 sums keep it
    within 1e-3 of the exact one; with the shift it would be the sigmoid of another value altogether."""
    network, image = realistic_network(seed=2), image_of(shape, seed=3)
    exact = 1 / (1 + np.exp(-reference_average(network, image, overlap, blending)))
    unshifted = in_graph(network, overlap, blending, batch_size, SIGMOID, "float16", max_shift=False)(image)
    np.testing.assert_allclose(unshifted.numpy(), exact, rtol=0, atol=1e-3)
    shifted = in_graph(network, overlap, blending, batch_size, SIGMOID, "float16")(image)
    assert np.abs(shifted.numpy() - exact).max() > 0.1


@pytest.mark.parametrize("accumulation", ["float32", "float16"])
def test_a_transform_may_return_probabilities_and_labels_from_one_pass(accumulation):
    shape, network, calls = (37, 29, 23), realistic_network(), []

    def counting(cut, positions):
        calls.append(len(positions))
        return network(cut, positions)

    image = image_of(shape)
    both = graph_windows.recombine_in_graph(counting, tf.constant(image), PATCH, 0.5, "gaussian", 3, NUM_CLASSES,
                                            lambda a: {"probabilities": SOFTMAX(a), "labels": ARGMAX(a)}, accumulation)
    assert sum(calls) == windows.window_grid(shape, PATCH, 0.5, "gaussian").num_windows
    alone = [in_graph(network, 0.5, "gaussian", 3, t, accumulation)(image).numpy() for t in (SOFTMAX, ARGMAX)]
    np.testing.assert_array_equal(both["probabilities"].numpy(), alone[0])
    np.testing.assert_array_equal(both["labels"].numpy(), alone[1])


def test_accumulation_is_checked():
    network, image = realistic_network(), tf.constant(image_of((20, 12, 16)))
    with pytest.raises(ValueError, match="accumulation = 'float16'.*blended logits"):
        graph_windows.recombine_in_graph(network, image, PATCH, 0.5, "gaussian", 2, NUM_CLASSES, None, "float16")
    with pytest.raises(ValueError, match="accumulation = 'bfloat16'; expected one of float32, float16"):
        graph_windows.recombine_in_graph(network, image, PATCH, 0.5, "gaussian", 2, NUM_CLASSES, SOFTMAX, "bfloat16")


def test_windows_come_x_major_in_batches_within_a_row():
    """Eagerly (the while loops run as Python loops) the window function sees every window of the grid once,
    in the order of `window_grid`, in batches of at most batch_size that never span two x starts."""
    shape, overlap, batch_size = (37, 29, 23), 0.5, 3
    grid = windows.window_grid(shape, PATCH, overlap, "gaussian")
    network, calls = realistic_network(), []

    def recording(cut, positions):
        calls.append(positions.numpy())
        return network(cut, positions)

    graph_windows.recombine_in_graph(recording, tf.constant(image_of(shape)), PATCH, overlap, "gaussian",
                                     batch_size, NUM_CLASSES, ARGMAX, "float16")
    assert all(1 <= len(c) <= batch_size and len(np.unique(c[:, 0])) == 1 for c in calls)
    np.testing.assert_array_equal(np.concatenate(calls), grid.positions)
    assert len(calls) == 4 * 3  # 4 rows of 8 windows: 3 + 3 + 2


def loop_graphs(function):
    """The graphs of the while loops' bodies and conditions inside a concrete function, nested ones too (the
    private FuncGraph._functions: TensorFlow keeps no public list of a graph's nested functions)."""
    return [nested.graph for nested in function.graph._functions.values()]


@pytest.mark.parametrize("accumulation", ["float32", "float16"])
def test_the_live_accumulator_is_one_row_of_windows(accumulation):
    """Traced for a 37 x 29 x 23 image (every shape static), the outer while loop carries one K-class tensor, the
    accumulator of (px = 16, 29, 23, K), and no K-class tensor inside the loops spans the 37 voxels of x; traced
    for any image shape, the accumulator is (16, None, None, K)."""
    shape, row = (37, 29, 23), [PATCH[0], 29, 23, NUM_CLASSES]
    function = in_graph(realistic_network(), 0.5, "gaussian", 3, SOFTMAX, accumulation, shape).get_concrete_function()
    assert class_tensors_carried(function) == [row]
    inside = [t.shape.as_list() for g in loop_graphs(function) for op in g.get_operations() for t in op.outputs
              if t.shape.rank and t.shape[-1] == NUM_CLASSES]
    assert row in inside and not [s for s in inside if shape[0] in s]
    function = in_graph(realistic_network(), 0.5, "gaussian", 3, SOFTMAX, accumulation).get_concrete_function()
    assert class_tensors_carried(function) == [[PATCH[0], None, None, NUM_CLASSES]]


def class_tensors_carried(function):
    """The shapes of the K-class tensors carried by the outer while loop of a concrete function."""
    [loop] = [op for op in function.graph.get_operations() if op.type in ("While", "StatelessWhile")]
    return [o.shape.as_list() for o in loop.outputs if o.shape.rank and o.shape[-1] == NUM_CLASSES]


def test_a_saved_model_reloads_and_segments_the_same(tmp_path):
    network, image = realistic_network(), image_of((23, 17, 20))
    module = tf.Module()
    module.labels = in_graph(network, 0.5, "gaussian", 4, ARGMAX, "float16")
    expected = module.labels(image).numpy()
    tf.saved_model.save(module, str(tmp_path / "saved"))
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    np.testing.assert_array_equal(reloaded.labels(image).numpy(), expected)
    np.testing.assert_array_equal(expected, reference_average(network, image, 0.5, "gaussian").argmax(-1))


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.33])
def test_in_graph_window_starts_are_those_of_windows_py(overlap):
    for window in (5, 12, 16, 40):
        sizes = range(window, window + 90)
        graph = [graph_windows.window_starts_in_graph(tf.constant(size), window, overlap).numpy() for size in sizes]
        for size, starts in zip(sizes, graph):
            np.testing.assert_array_equal(starts, window_starts(size, window, overlap), err_msg=f"{size} {window}")
