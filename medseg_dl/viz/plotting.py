"""Figures of volumes, training patches and learning curves, saved as PNG (numpy + matplotlib only).

Each `*_figure` function builds a `matplotlib.figure.Figure` without pyplot (so no global backend
is set and nothing is shown); `save_png` renders it with Agg and writes the file atomically
(medseg_dl.runtime.atomic), so a crash leaves no half-written PNG. `robust_window` is the project's one
display window (also used by the TensorBoard image summaries of training and evaluation).

Slices are drawn with the first in-plane voxel axis horizontal and the second vertical, origin at
the lower left: axial = x/y at fixed z, coronal = x/z at fixed y, sagittal = y/z at fixed x, in the
voxel order of the arrays (no reorientation). Panel extents are in mm, so anisotropic voxels keep
their true aspect. Class c >= 1 is drawn in `class_color(c)`; the reference solid, the prediction
dashed.
"""
import csv
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from medseg_dl.errors import DataError
from medseg_dl.runtime import atomic

CLASS_COLORS = ("#ff2020", "#00c8ff", "#ffd400", "#30ff30", "#ff30ff", "#ff8c00", "#9070ff", "#00ffb0")
VIEWS = (("axial", 2, (0, 1)), ("coronal", 1, (0, 2)), ("sagittal", 0, (1, 2)))  # name, cut axis, in-plane
AXIS_NAMES = "xyz"
PREDICTION_DASHES = (0, (3, 2))


def class_color(label: int) -> str:
    """Hex colour of foreground class `label` (>= 1); the palette repeats after 8 classes."""
    return CLASS_COLORS[(int(label) - 1) % len(CLASS_COLORS)]


def save_png(fig: Figure, path) -> str:
    """Render `fig` to a PNG at `path` atomically, creating the folder; returns `path` as str."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic.replacing(path) as temporary, open(temporary, "wb") as stream:
        fig.savefig(stream, format="png")
    return path


def robust_window(image: np.ndarray) -> Tuple[float, float]:
    """(low, high) grey-level window: the 1st and 99th percentiles of the finite values of `image`."""
    values = np.asarray(image, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(values, (1.0, 99.0)))
    return (low, high) if high > low else (low, low + 1.0)


def display_scaled(image: np.ndarray) -> np.ndarray:
    """`image` (any shape) as float32 in [0, 1]: its `robust_window` mapped to [0, 1], clipped."""
    low, high = robust_window(image)
    return np.clip((np.asarray(image, np.float32) - low) / (high - low), 0.0, 1.0)


def _check_volume(image, channel: int, label_maps: Dict[str, Optional[np.ndarray]], spacing_mm) -> np.ndarray:
    """The (X, Y, Z) channel of `image` (X, Y, Z) or (X, Y, Z, C); raises DataError on bad shapes."""
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise DataError(f"plotting: image has shape {image.shape}; pass (X, Y, Z) or (X, Y, Z, C)")
    if image.ndim == 4:
        if not 0 <= channel < image.shape[3]:
            raise DataError(f"plotting: channel {channel} does not exist in an image with "
                            f"{image.shape[3]} channels; pass channel in [0, {image.shape[3] - 1}]")
        image = image[..., channel]
    for name, labels in label_maps.items():
        if labels is not None and np.shape(labels) != image.shape:
            raise DataError(f"plotting: {name} has shape {np.shape(labels)} but the image is "
                            f"{image.shape}; pass a label map of the image's spatial shape")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise DataError(f"plotting: spacing_mm={tuple(spacing_mm)}; pass three positive voxel sizes in mm")
    return image


def _centre_vox(label_maps: Sequence[Optional[np.ndarray]], shape: Tuple[int, ...]) -> Tuple[int, int, int]:
    """Voxel index of the foreground centroid of the first non-empty label map, else the volume centre."""
    for labels in label_maps:
        if labels is not None:
            foreground = np.nonzero(np.asarray(labels) > 0)
            if foreground[0].size:
                return tuple(int(round(float(np.mean(axis)))) for axis in foreground)
    return tuple(size // 2 for size in shape)


def _classes(label_maps: Sequence[Optional[np.ndarray]], class_names: Optional[Sequence[str]]) -> List[int]:
    """Sorted foreground classes: those present in any label map plus 1..len(class_names) - 1."""
    present = set(range(1, len(class_names))) if class_names else set()
    for labels in label_maps:
        if labels is not None:
            present.update(int(value) for value in np.unique(labels) if value > 0)
    return sorted(present)


def _class_name(label: int, class_names: Optional[Sequence[str]]) -> str:
    """Name of class `label` in `class_names` (index = label), or the label value where they do not name it
    (the callers name every class: config.params.default_class_name)."""
    return class_names[label] if class_names and label < len(class_names) else str(label)


def _contour(ax, mask_2d: np.ndarray, spacing_2d: Sequence[float], color: str, linestyle) -> None:
    """Outline the True region of `mask_2d` (H, V) halfway between inside and outside voxel centres
    (axes in mm); the mask is zero-padded so regions touching the slice border close."""
    if not mask_2d.any():
        return
    padded = np.pad(mask_2d, 1).astype(np.float32)
    h_mm = (np.arange(-1, mask_2d.shape[0] + 1) + 0.5) * spacing_2d[0]
    v_mm = (np.arange(-1, mask_2d.shape[1] + 1) + 0.5) * spacing_2d[1]
    ax.contour(h_mm, v_mm, padded.T, levels=[0.5], colors=[color], linestyles=[linestyle], linewidths=1.6)


def _draw_panel(ax, image_2d, spacing_2d, window, outlines, classes, fill_2d=None) -> None:
    """Draw one slice: `image_2d` (H, V) float in grey, the optional label map `fill_2d` (H, V) filled
    translucently, and for each (labels_2d (H, V) int, linestyle) in `outlines` one contour per class."""
    extent_mm = (0.0, image_2d.shape[0] * spacing_2d[0], 0.0, image_2d.shape[1] * spacing_2d[1])
    ax.imshow(image_2d.T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
              extent=extent_mm, interpolation="nearest")
    if fill_2d is not None and classes:
        colors = ListedColormap([class_color(c) for c in range(1, max(classes) + 1)])
        ax.imshow(np.ma.masked_less_equal(fill_2d.T, 0), cmap=colors, vmin=0.5, vmax=max(classes) + 0.5,
                  alpha=0.35, origin="lower", extent=extent_mm, interpolation="nearest")
    for labels_2d, linestyle in outlines:
        for label in classes:
            _contour(ax, labels_2d == label, spacing_2d, class_color(label), linestyle)
    ax.set_xlim(extent_mm[0], extent_mm[1])
    ax.set_ylim(extent_mm[2], extent_mm[3])
    ax.set_aspect("equal")


def orthogonal_figure(image, reference=None, prediction=None, class_names=None, spacing_mm=(1.0, 1.0, 1.0),
                      title=None, channel: int = 0) -> Figure:
    """Axial, coronal and sagittal slices through the foreground centroid, with class contours.

    image: (X, Y, Z) or (X, Y, Z, C) float; channel `channel` is shown, windowed to its 1st-99th
    percentile. reference, prediction: optional (X, Y, Z) int label maps, outlined solid and dashed.
    The slices cross the foreground centroid of the reference, else of the prediction, else the
    volume centre. class_names: names indexed by class (index 0 = background). spacing_mm: voxel
    size (x, y, z) in mm; panel axes are in mm.
    """
    volume = _check_volume(image, channel, {"reference": reference, "prediction": prediction}, spacing_mm)
    label_maps = [np.asarray(m) if m is not None else None for m in (reference, prediction)]
    centre = _centre_vox(label_maps, volume.shape)
    classes = _classes(label_maps, class_names)
    window = robust_window(volume)
    extents_mm = [[volume.shape[a] * spacing_mm[a] for a in plane] for _, _, plane in VIEWS]
    panels_height_in = 0.85 * 12.0 * max(v for _, v in extents_mm) / sum(h for h, _ in extents_mm)
    fig = Figure(figsize=(12.0, min(max(panels_height_in, 2.5), 14.0) + 1.6), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[h for h, _ in extents_mm])
    for ax, (name, cut, plane) in zip(axes, VIEWS):
        outlines = [(np.take(m, centre[cut], axis=cut), style)
                    for m, style in zip(label_maps, ("solid", PREDICTION_DASHES)) if m is not None]
        _draw_panel(ax, np.take(volume, centre[cut], axis=cut), [spacing_mm[a] for a in plane], window,
                    outlines, classes)
        ax.set_title(f"{name} ({AXIS_NAMES[cut]} = {centre[cut]})")
        ax.set_xlabel(f"{AXIS_NAMES[plane[0]]} (mm)")
        ax.set_ylabel(f"{AXIS_NAMES[plane[1]]} (mm)")
    _overlay_legend(fig, classes, class_names, reference is not None, prediction is not None)
    if title:
        fig.suptitle(title)
    return fig


def _overlay_legend(fig, classes, class_names, has_reference: bool, has_prediction: bool) -> None:
    """A legend below the panels: one colour per class, then the line styles of reference and prediction."""
    handles = [Line2D([], [], color=class_color(c), linewidth=4, label=_class_name(c, class_names))
               for c in classes]
    if has_reference:
        handles.append(Line2D([], [], color="black", label="reference"))
    if has_prediction:
        handles.append(Line2D([], [], color="black", linestyle=PREDICTION_DASHES, label="prediction"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), frameon=False)


def orthogonal_overlay(image, path, reference=None, prediction=None, class_names=None,
                       spacing_mm=(1.0, 1.0, 1.0), title=None, channel: int = 0) -> str:
    """Save `orthogonal_figure(...)` as a PNG at `path` (atomically); returns `path`."""
    return save_png(orthogonal_figure(image, reference, prediction, class_names, spacing_mm, title, channel),
                    path)


def _patch_title(index: int, subject, position) -> str:
    """'patch <index>: <subject>  position (x, y, z)' from optional bytes/str subject and (3,) position."""
    text = f"patch {index}"
    if subject is not None:
        text += ": " + (subject.decode("utf-8", "replace") if isinstance(subject, bytes) else str(subject))
    if position is not None:
        text += "  position (" + ", ".join(f"{float(p):.2f}" for p in position) + ")"
    return text


def batch_figure(batch: Dict[str, np.ndarray], max_patches: int = 16) -> Figure:
    """One row per patch (the first `max_patches`): the three mid-slices of channel 0 with the label
    filled translucently and outlined, titled with the subject id and normalised patch position.

    batch: image (N, px, py, pz, C) float, label (N, px, py, pz) int, optional position (N, 3) float
    in [0, 1] and subject (N,) bytes or str. Voxels are drawn square (patches are in voxels).
    """
    for key, ndim in (("image", 5), ("label", 4)):
        if key not in batch or np.ndim(batch[key]) != ndim:
            raise DataError(f"batch_grid: batch['{key}'] must be a {ndim}-D array; got "
                            f"{np.shape(batch[key]) if key in batch else 'no such key'}")
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    if images.shape[:4] != labels.shape or len(images) == 0 or max_patches < 1:
        raise DataError(f"batch_grid: image {images.shape} and label {labels.shape} must hold the same "
                        f"N >= 1 patches (N, px, py, pz[, C]), and max_patches ({max_patches}) must be >= 1")
    rows = min(len(images), max_patches)
    classes = sorted(int(value) for value in np.unique(labels[:rows]) if value > 0)
    fig = Figure(figsize=(7.2, 2.6 * rows), layout="constrained")
    for row, subfig in enumerate(np.atleast_1d(fig.subfigures(rows, 1))):
        image, label = images[row, ..., 0], labels[row]
        window = robust_window(image)
        for ax, (name, cut, plane) in zip(subfig.subplots(1, 3), VIEWS):
            image_2d, label_2d = (np.take(v, v.shape[cut] // 2, axis=cut) for v in (image, label))
            _draw_panel(ax, image_2d, (1.0, 1.0), window, [(label_2d, "solid")], classes, fill_2d=label_2d)
            ax.set_title(f"{name}, {AXIS_NAMES[plane[0]]}{AXIS_NAMES[plane[1]]}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        subject = batch["subject"][row] if "subject" in batch else None
        position = batch["position"][row] if "position" in batch else None
        subfig.suptitle(_patch_title(row, subject, position), fontsize=9)
    return fig


def batch_grid(batch: Dict[str, np.ndarray], path, max_patches: int = 16) -> str:
    """Save `batch_figure(batch, max_patches)` as a PNG at `path` (atomically); returns `path`."""
    return save_png(batch_figure(batch, max_patches), path)


def _no_data(ax) -> None:
    """Write 'no data yet' in the middle of an empty panel."""
    ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="0.4")


def _series(rows: Sequence[Dict[str, float]], key: str) -> Tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have `key`, sorted by step."""
    pairs = sorted((row["step"], row[key]) for row in rows if key in row)
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.float64)


def _log_if_wide(ax, values: np.ndarray) -> None:
    """Use a log y scale when the positive finite `values` span more than one decade."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size and positive.max() > 10.0 * positive.min():
        ax.set_yscale("log")


def _plot_loss(ax, train_rows) -> None:
    """Training loss vs step (log-y over > 1 decade); learning rate on a right axis when logged."""
    ax.set_title("training loss")
    ax.set_xlabel("step")
    if not train_rows:
        _no_data(ax)
        return
    steps, loss = _series(train_rows, "loss")
    ax.plot(steps, loss, color="black", linewidth=1.2, label="loss")
    ax.set_ylabel("loss")
    _log_if_wide(ax, loss)
    lr_steps, learning_rate = _series(train_rows, "learning_rate")
    if lr_steps.size:
        lr_ax = ax.twinx()
        lr_ax.plot(lr_steps, learning_rate, color="tab:orange", linewidth=1.0, label="learning rate")
        lr_ax.set_ylabel("learning rate", color="tab:orange")
        _log_if_wide(lr_ax, learning_rate)


def _dice_keys(eval_rows, class_names) -> List[Tuple[str, str, str]]:
    """(key, legend label, colour) of each per-class Dice column in `eval_rows`, in class order."""
    present = list(dict.fromkeys(k for row in eval_rows for k in row if k.startswith("dice_")))
    names = list(class_names) if class_names else [key[len("dice_"):] for key in present]
    offset = 0 if class_names else 1  # class_names index = class; discovered names count from class 1
    return [(f"dice_{name}", name, class_color(index + offset) if index + offset else "0.5")
            for index, name in enumerate(names) if f"dice_{name}" in present]


def _plot_dice(ax, eval_rows, class_names) -> None:
    """Validation Dice per class (class colours) and mean (thick black) vs step, y in [0, 1]."""
    ax.set_title("validation Dice")
    ax.set_xlabel("step")
    ax.set_ylim(0.0, 1.02)
    if not eval_rows:
        _no_data(ax)
        return
    for key, label, color in _dice_keys(eval_rows, class_names):
        ax.plot(*_series(eval_rows, key), color=color, marker=".", linewidth=1.2, label=label)
    steps, mean_dice = _series(eval_rows, "mean_dice")
    if steps.size:
        ax.plot(steps, mean_dice, color="black", marker="o", linewidth=2.0, label="mean")
    ax.set_ylabel("Dice")
    ax.legend(loc="lower right", fontsize=8)


def learning_curves_figure(train_rows, eval_rows, class_names=None) -> Figure:
    """Two panels: training loss vs step, validation Dice (per class and mean) vs step.

    train_rows: dicts with step (int), loss and optional learning_rate (float).
    eval_rows: dicts with step, mean_dice and per-class `dice_<class_name>` (Dice in [0, 1]).
    class_names: names indexed by class (index 0 = background) to fix order and colours; None
    plots every dice_* column. An empty list gives a panel saying "no data yet".
    """
    fig = Figure(figsize=(12.0, 4.5), layout="constrained")
    loss_ax, dice_ax = fig.subplots(1, 2)
    _plot_loss(loss_ax, train_rows)
    _plot_dice(dice_ax, eval_rows, class_names)
    return fig


def learning_curves(train_rows, eval_rows, path, class_names=None) -> str:
    """Save `learning_curves_figure(...)` as a PNG at `path` (atomically); returns `path`."""
    return save_png(learning_curves_figure(train_rows, eval_rows, class_names), path)


def _parse_value(text: Optional[str], key: str, path: str, line: int) -> float:
    """float(text); an empty or missing cell is NaN; anything else raises DataError."""
    if text is None or text.strip() == "":
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{path}, line {line}, column '{key}': {text!r} is not a number; "
                        "the file must hold numeric scalars only (fix or delete it)") from None


def read_csv_rows(path) -> List[Dict[str, float]]:
    """Rows of a CSV of scalars with a header line, as dicts of float ('step' as int).

    A missing file gives []. Empty cells are NaN. A last line without its newline (a writer caught
    mid-line) is skipped, so a file another process is appending to can be read at any time.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    with open(path, newline="") as stream:
        lines = stream.read().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    rows = []
    for line, row in enumerate(csv.DictReader(lines), start=2):
        if None in row:
            raise DataError(f"{path}, line {line}: more cells than header columns; fix or delete the file")
        parsed = {key: _parse_value(text, key, path, line) for key, text in row.items()}
        if "step" in parsed:
            if not math.isfinite(parsed["step"]):
                raise DataError(f"{path}, line {line}: the 'step' cell is empty; fix or delete the file")
            parsed["step"] = int(parsed["step"])
        rows.append(parsed)
    return rows


def show_volume(image, reference=None, prediction=None, out=None, spacing_mm=(1.0, 1.0, 1.0),
                class_names=None, title=None):
    """Look at a volume: with a display (DISPLAY set) and no `out`, open nibabel's OrthoSlicer3D
    viewers (image (X, Y, Z) or (X, Y, Z, C), then each label map, positions linked) and block until
    they are closed, returning None; otherwise save `orthogonal_overlay` at `out` (default
    "show.png") and return its path."""
    if out is not None or not os.environ.get("DISPLAY"):
        return orthogonal_overlay(image, out or "show.png", reference, prediction, class_names,
                                  spacing_mm, title)
    _check_volume(image, 0, {"reference": reference, "prediction": prediction}, spacing_mm)
    from nibabel.viewers import OrthoSlicer3D

    affine = np.diag([*map(float, spacing_mm), 1.0])
    viewers = [OrthoSlicer3D(np.asarray(image, np.float32), affine, title=title or "image")]
    for name, labels in (("reference", reference), ("prediction", prediction)):
        if labels is not None:
            viewer = OrthoSlicer3D(np.asarray(labels, np.float32), affine, title=name)
            top = max(1, int(np.max(labels)))
            viewer.cmap = ListedColormap(["black"] + [class_color(c) for c in range(1, top + 1)])
            viewer.clim = (-0.5, top + 0.5)
            viewers[0].link_to(viewer)
            viewers.append(viewer)
    viewers[0].show()
    return None
