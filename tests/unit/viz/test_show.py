"""What `medseg show` draws from files: every label value in the picture has a name."""
import nibabel as nib
import numpy as np

from medseg_dl.viz import plotting, show


def test_show_files_names_the_labels_the_names_leave_out(tmp_path, monkeypatch):
    """Named classes keep their names; label values past them are called class_<k> (config's one rule)."""
    labels = np.zeros((6, 7, 5), np.int16)
    labels[1:3, 1:3, 1:3], labels[4, 4, 3] = 1, 3
    for name, data in (("image", np.ones(labels.shape, np.float32)), ("label", labels)):
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
    drawn = {}
    monkeypatch.setattr(plotting, "show_volume", lambda *args, **kwargs: drawn.update(kwargs))
    show.show_files(str(tmp_path / "image.nii.gz"), str(tmp_path / "label.nii.gz"), class_names=["bg", "left"])
    assert drawn["class_names"] == ["bg", "left", "class_2", "class_3"]
    show.show_files(str(tmp_path / "image.nii.gz"), str(tmp_path / "label.nii.gz"))
    assert drawn["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
