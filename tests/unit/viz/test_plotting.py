"""Plotting: PNGs are written atomically, contours sit on the structures, aspect follows spacing."""
import csv
import io
import os

import matplotlib
import matplotlib.image
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from medseg_dl.errors import DataError
from medseg_dl.viz import plotting

SHAPE = (20, 24, 15)
CUBE_1 = (slice(4, 9), slice(6, 11), slice(5, 10))  # class 1
CUBE_2 = (slice(12, 15), slice(14, 17), slice(11, 14))  # class 2


@pytest.fixture
def volume():
    """(X, Y, Z) float32 image with a smooth gradient plus noise, and its (X, Y, Z) int32 label map."""
    rng = np.random.default_rng(0)
    image = np.add.outer(np.add.outer(np.arange(20), np.arange(24)), np.arange(15)).astype(np.float32)
    image += rng.normal(0, 2, SHAPE).astype(np.float32)
    labels = np.zeros(SHAPE, np.int32)
    labels[CUBE_1] = 1
    labels[CUBE_2] = 2
    return image, labels


def read_png(path):
    """RGBA float array of a PNG file (or buffer); fails if it is not a valid PNG."""
    pixels = matplotlib.image.imread(path, format="png")
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    return pixels


def colour_mask(pixels, colour, tolerance=0.1):
    """(H, W) bool: pixels within `tolerance` of `colour` in every RGB channel."""
    return np.all(np.abs(pixels[..., :3] - np.array(to_rgb(colour))) < tolerance, axis=-1)


def render(fig):
    """Draw `fig` to PNG pixels (its layout is final afterwards)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    buffer.seek(0)
    return read_png(buffer)


def panel_pixels_mm(fig, pixels, ax, colour):
    """Data coordinates (mm) of the pixels of `colour` inside the box of axes `ax`, shape (K, 2)."""
    height = pixels.shape[0]
    box = ax.get_window_extent()
    rows, cols = np.nonzero(colour_mask(pixels, colour))
    display = np.stack([cols + 0.5, height - rows - 0.5], axis=1)
    inside = ((display[:, 0] > box.x0) & (display[:, 0] < box.x1)
              & (display[:, 1] > box.y0) & (display[:, 1] < box.y1))
    return ax.transData.inverted().transform(display[inside])


def test_overlay_png_is_written_atomically(volume, tmp_path):
    image, labels = volume
    target = tmp_path / "new_folder" / "overlay.png"
    returned = plotting.orthogonal_overlay(image, target, reference=labels, prediction=labels,
                                           class_names=["background", "a", "b"], title="case")
    assert returned == str(target)
    pixels = read_png(target)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 600
    assert os.listdir(target.parent) == ["overlay.png"]


def test_class_contours_sit_on_their_structures(volume):
    image, labels = volume
    fig = plotting.orthogonal_figure(image, reference=labels, spacing_mm=(1.0, 1.0, 2.0))
    pixels = render(fig)
    axial, coronal, _ = fig.axes[:3]
    centre = np.rint(np.argwhere(labels > 0).mean(axis=0)).astype(int)  # (7, 9, 8)
    assert axial.get_title() == f"axial (z = {centre[2]})"
    assert coronal.get_title() == f"coronal (y = {centre[1]})"
    xy_mm = panel_pixels_mm(fig, pixels, axial, plotting.class_color(1))
    assert len(xy_mm) > 20
    assert xy_mm[:, 0].min() > 4 - 1 and xy_mm[:, 0].max() < 9 + 1  # cube x in [4, 9] mm, 1 mm slack
    assert xy_mm[:, 1].min() > 6 - 1 and xy_mm[:, 1].max() < 11 + 1
    xz_mm = panel_pixels_mm(fig, pixels, coronal, plotting.class_color(1))
    assert xz_mm[:, 1].min() > 2 * 5 - 1 and xz_mm[:, 1].max() < 2 * 10 + 1  # z in mm: spacing 2
    assert len(panel_pixels_mm(fig, pixels, axial, plotting.class_color(2))) == 0  # class 2: off this slice


def test_prediction_alone_is_outlined(volume):
    image, labels = volume
    pixels = render(plotting.orthogonal_figure(image, prediction=labels))
    assert colour_mask(pixels, plotting.class_color(1)).sum() > 20


def test_no_label_maps_no_class_colours(volume, tmp_path):
    image, _ = volume
    pixels = read_png(plotting.orthogonal_overlay(image, tmp_path / "plain.png"))
    for colour in plotting.CLASS_COLORS:
        assert not colour_mask(pixels, colour).any()


def test_anisotropic_spacing_changes_the_panel_aspect(volume):
    image, labels = volume
    ratios = []
    for spacing_mm in ((1.0, 1.0, 1.0), (1.0, 1.0, 3.0)):
        fig = plotting.orthogonal_figure(image, reference=labels, spacing_mm=spacing_mm)
        render(fig)
        coronal = fig.axes[1]
        assert coronal.get_xlim() == (0.0, 20.0) and coronal.get_ylim() == (0.0, 15 * spacing_mm[2])
        box = coronal.get_window_extent()
        ratios.append(box.height / box.width)
    assert ratios[0] == pytest.approx(15 / 20, rel=0.03)
    assert ratios[1] == pytest.approx(45 / 20, rel=0.03)


def test_channel_selection_and_shape_errors(volume):
    image, labels = volume
    two_channels = np.stack([np.zeros_like(image), image], axis=-1)
    fig = plotting.orthogonal_figure(two_channels, reference=labels, channel=1)
    axial_through_centroid = image[:, :, 8].T
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), axial_through_centroid)
    with pytest.raises(DataError, match="channel 2"):
        plotting.orthogonal_figure(two_channels, channel=2)
    with pytest.raises(DataError, match="reference"):
        plotting.orthogonal_figure(image, reference=labels[:-1])


def test_windowing_uses_percentiles():
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    assert plotting.robust_window(values) == pytest.approx((9.99, 989.01))
    assert plotting.robust_window(np.full((3, 3, 3), 5.0)) == (5.0, 6.0)


def patch_batch(volume, count):
    """A batch of `count` (8, 10, 6) patches cut from `volume`, with subjects and positions."""
    image, labels = volume
    corners = [(2 + i, 4, 3) for i in range(count)]
    cut = [tuple(slice(c, c + s) for c, s in zip(corner, (8, 10, 6))) for corner in corners]
    return {"image": np.stack([image[c] for c in cut])[..., None],
            "label": np.stack([labels[c] for c in cut]),
            "position": np.tile([[0.25, 0.5, 0.75]], (count, 1)).astype(np.float32),
            "subject": np.array([f"case_{i}".encode() for i in range(count)])}


def test_batch_grid_rows_titles_and_overlay(volume, tmp_path):
    batch = patch_batch(volume, 5)
    heights = [read_png(plotting.batch_grid(batch, tmp_path / f"grid{n}.png", max_patches=n)).shape[0]
               for n in (2, 4)]
    assert heights[1] == 2 * heights[0]
    assert sorted(os.listdir(tmp_path)) == ["grid2.png", "grid4.png"]
    pixels = read_png(tmp_path / "grid4.png")
    assert colour_mask(pixels, plotting.class_color(1)).sum() > 20
    fig = plotting.batch_figure(batch, max_patches=3)
    titles = [subfig.texts[0].get_text() for subfig in fig.subfigs]
    assert titles == [f"patch {i}: case_{i}  position (0.25, 0.50, 0.75)" for i in range(3)]


def test_batch_grid_needs_image_and_label(volume):
    batch = patch_batch(volume, 2)
    del batch["label"]
    with pytest.raises(DataError, match="label"):
        plotting.batch_figure(batch)
    batch["label"] = np.zeros((2, 8, 10, 5), np.int32)
    with pytest.raises(DataError, match="same N >= 1 patches"):
        plotting.batch_figure(batch)


def test_learning_curves_with_empty_rows(tmp_path):
    path = plotting.learning_curves([], [], tmp_path / "curves.png")
    assert read_png(path).shape[1] > 600
    assert os.listdir(tmp_path) == ["curves.png"]
    fig = plotting.learning_curves_figure([], [])
    assert [[t.get_text() for t in ax.texts] for ax in fig.axes] == [["no data yet"]] * 2


def test_learning_curves_scales_and_lines():
    train = [{"step": s, "loss": 10.0 / (1 + s), "learning_rate": 0.01} for s in range(0, 100, 10)]
    evaluation = [{"step": s, "mean_dice": s / 200, "dice_anterior": s / 100, "dice_posterior": s / 400}
                  for s in (100, 50, 150)]
    fig = plotting.learning_curves_figure(train, evaluation, ["background", "anterior", "posterior"])
    loss_ax, dice_ax, lr_ax = fig.axes
    assert loss_ax.get_yscale() == "log" and lr_ax.get_ylabel() == "learning rate"
    lines = {line.get_label(): line for line in dice_ax.get_lines()}
    assert list(lines) == ["anterior", "posterior", "mean"]
    np.testing.assert_array_equal(lines["anterior"].get_xdata(), [50, 100, 150])
    np.testing.assert_allclose(lines["anterior"].get_ydata(), [0.5, 1.0, 1.5])
    assert lines["posterior"].get_color() == plotting.class_color(2)
    narrow = plotting.learning_curves_figure([{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.2}], [])
    assert narrow.axes[0].get_yscale() == "linear" and len(narrow.axes) == 2


def test_read_csv_rows_round_trip(tmp_path):
    path = tmp_path / "train.csv"
    rows = [{"step": 10, "loss": 0.75, "learning_rate": 1e-3},
            {"step": 20, "loss": 0.5, "learning_rate": 5e-4}]
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["step", "loss", "learning_rate"])
        writer.writeheader()
        writer.writerows(rows)
        stream.write("30,0.2")  # a writer caught mid-line
    read = plotting.read_csv_rows(path)
    assert read == rows and all(type(row["step"]) is int for row in read)
    assert plotting.read_csv_rows(tmp_path / "missing.csv") == []


def test_read_csv_rows_empty_and_bad_cells(tmp_path):
    path = tmp_path / "eval.csv"
    path.write_text("step,mean_dice\n5,\n")
    [row] = plotting.read_csv_rows(path)
    assert row["step"] == 5 and np.isnan(row["mean_dice"])
    path.write_text("step,mean_dice\n5,high\n")
    with pytest.raises(DataError, match="line 2, column 'mean_dice'"):
        plotting.read_csv_rows(path)


def test_show_volume_without_display_writes_png(volume, tmp_path, monkeypatch):
    image, labels = volume
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.chdir(tmp_path)
    assert plotting.show_volume(image, labels) == "show.png"
    assert read_png(tmp_path / "show.png").shape[1] > 600


def test_show_volume_with_display_opens_linked_viewers(volume, monkeypatch):
    import nibabel.viewers
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    opened = []

    class RecordingViewer(nibabel.viewers.OrthoSlicer3D):
        def show(self):
            opened.append(self)

    created = []

    def create(*args, **kwargs):
        created.append(RecordingViewer(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(nibabel.viewers, "OrthoSlicer3D", create)
    monkeypatch.setenv("DISPLAY", ":0")
    image, labels = volume
    try:
        assert plotting.show_volume(image, labels, labels, spacing_mm=(1.0, 1.0, 2.0)) is None
        assert len(created) == 3 and opened == [created[0]]
        created[0].set_position(3.0, 4.0, 10.0)
        for viewer in created[1:]:
            np.testing.assert_allclose(viewer.position[:3], [3.0, 4.0, 10.0])
    finally:
        plt.close("all")
