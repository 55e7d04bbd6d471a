"""Atomic writes: a failure in the middle of a write leaves the previous file (or folder) intact and no
temporary behind, for the helper and for the writers that use it."""
import contextlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
from matplotlib.figure import Figure

from medseg_dl.config.params import Params
from medseg_dl.data import io, store
from medseg_dl.evaluation import report
from medseg_dl.runtime import atomic
from medseg_dl.viz import plotting


class Fault(Exception):
    pass


def leftovers(folder):
    return [name for name in os.listdir(folder) if name.startswith(atomic.TEMPORARY_PREFIX)]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic.write_json(target, {"step": 1})
    with pytest.raises(Fault):
        with atomic.replacing(target) as temporary:
            with open(temporary, "w") as f:
                f.write('{"step": 2, "half')  # a partial write, then the failure
            raise Fault
    assert json.loads(target.read_text()) == {"step": 1}
    assert leftovers(tmp_path) == []
    atomic.write_json(target, {"step": 2})
    assert json.loads(target.read_text()) == {"step": 2} and leftovers(tmp_path) == []


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "report"
    for content, fail in (("first", False), ("second", True), ("third", False)):
        with pytest.raises(Fault) if fail else contextlib.nullcontext():
            with atomic.replacing(target) as folder:
                os.makedirs(folder)
                (tmp_path / os.path.basename(folder) / "a.txt").write_text(content)
                if fail:
                    raise Fault
        assert (target / "a.txt").read_text() == ("first" if content == "second" else content)
        assert sorted(os.listdir(target)) == ["a.txt"] and leftovers(tmp_path) == []


def test_temporary_names_keep_the_suffix_and_are_hidden(tmp_path):
    name = os.path.basename(atomic.temporary_name(str(tmp_path / "case.nii.gz")))
    assert name.startswith(atomic.TEMPORARY_PREFIX) and name.endswith("-case.nii.gz")
    assert name != os.path.basename(atomic.temporary_name(str(tmp_path / "case.nii.gz")))


def test_params_nifti_record_png_and_report_writers_fail_cleanly(tmp_path, monkeypatch):
    """Each writer's underlying library fails after writing part of its output."""
    params = Params.from_dict({"data": {"num_classes": 2}})
    params.save(tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()

    class DiskFull:  # a text file that takes half of the text, then fails
        def __init__(self, path, mode, encoding=None):
            self.stream = open(path, mode, encoding=encoding)

        def write(self, text):
            self.stream.write(text[: len(text) // 2])
            raise Fault

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()
    monkeypatch.setattr(atomic, "open", DiskFull, raising=False)
    with pytest.raises(Fault):
        Params.from_dict({"data": {"num_classes": 3}}).save(tmp_path / "params.yaml")
    monkeypatch.undo()
    assert (tmp_path / "params.yaml").read_text() == before

    io.write_volume(str(tmp_path / "label.nii.gz"), np.ones((3, 3, 3), np.uint8), np.eye(4))
    monkeypatch.setattr(nib, "save", _fails_after(lambda image, path: open(path, "wb").write(b"\x1f\x8b partial")))
    with pytest.raises(Fault):
        io.write_volume(str(tmp_path / "label.nii.gz"), np.zeros((3, 3, 3), np.uint8), np.eye(4))
    monkeypatch.undo()
    assert np.asanyarray(nib.load(str(tmp_path / "label.nii.gz")).dataobj).min() == 1

    case = str(tmp_path / store.case_name("s"))
    meta = {"shape": [4, 4, 4], "channels": 1}
    store.write_case(case, np.zeros((4, 4, 4, 1)), np.zeros((4, 4, 4)), {"class_locations": np.zeros((0, 3), np.int32)},
                     meta, (2, 2, 2))
    before = store.read_arrays(case)["meta"]
    compress, calls = store.zlib.compress, []

    def compress_five_chunks(*args):  # the sixth chunk fails
        calls.append(1)
        if len(calls) > 5:
            raise Fault
        return compress(*args)
    monkeypatch.setattr(store.zlib, "compress", compress_five_chunks)
    with pytest.raises(Fault):
        store.write_case(case, np.ones((4, 4, 4, 1)), np.ones((4, 4, 4)), {"class_locations": np.zeros((0, 3), np.int32)},
                         meta, (2, 2, 2))
    monkeypatch.undo()
    assert store.read_arrays(case)["meta"] == before and store.read_arrays(case)["image"].max() == 0
    assert os.listdir(tmp_path).count(store.case_name("s")) == 1 and not [n for n in os.listdir(tmp_path)
                                                                          if n.startswith(".tmp-")]

    plotting.save_png(Figure(), tmp_path / "plot.png")
    png = (tmp_path / "plot.png").read_bytes()
    broken = Figure()
    broken.savefig = _fails_after(lambda stream, format: stream.write(b"\x89PNG partial"))
    with pytest.raises(Fault):
        plotting.save_png(broken, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes() == png
    assert leftovers(tmp_path) == []


def test_a_report_that_fails_midway_keeps_the_previous_report(tmp_path, monkeypatch):
    params = Params.from_dict({"data": {"num_classes": 2}, "evaluation": {"save_overlays": True}})
    label = np.zeros((6, 6, 6), np.int32)
    label[2:4, 2:4, 2:4] = 1
    case = report.Segmentation("c", label[..., None].astype(np.float32), label, label, np.ones(3), np.eye(4))
    folder = tmp_path / "eval" / "5"
    os.makedirs(folder.parent)
    first = report.write_report(str(folder), [case], params, 5)
    monkeypatch.setattr(plotting, "orthogonal_overlay", _fails_after(lambda *a, **k: None))
    with pytest.raises(Fault):
        report.write_report(str(folder), [report.Segmentation("c", case.image, label, np.zeros_like(label),
                                                              np.ones(3), np.eye(4))], params, 5)
    assert json.loads((folder / "summary.json").read_text())["mean_dice"] == first["mean_dice"] == 1.0
    assert sorted(os.listdir(folder)) == ["metrics.csv", "overlays", "summary.json"]
    assert leftovers(folder.parent) == []


def _fails_after(action):
    def run(*args, **kwargs):
        action(*args, **kwargs)
        raise Fault
    return run
