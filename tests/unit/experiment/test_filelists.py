"""The file lists of a model folder read back: subjects and ids in list order, a missing list one line naming it."""
import json
import os

import pytest

from medseg_dl.data.subjects import Subject
from medseg_dl.errors import DataError
from medseg_dl.experiment.filelists import filelist_subjects, filelists_written, read_filelist
from medseg_dl.experiment.model_dir import ModelDir


def test_a_list_is_read_back_in_its_order_without_the_sizes(tmp_path):
    model_dir = ModelDir(str(tmp_path))
    entries = [{"id": "b", "channels": ["/d/b.nii.gz"], "label": "/d/b_label.nii.gz", "mask": None, "bytes": [3, 2]},
               {"id": "a", "channels": ["/d/a.nii.gz"], "label": None, "mask": None, "bytes": [4]}]
    os.makedirs(model_dir.filelists)
    with open(model_dir.filelist("val"), "w") as f:
        json.dump(entries, f)
    assert filelist_subjects(model_dir, "val") == [Subject("b", ["/d/b.nii.gz"], "/d/b_label.nii.gz"),
                                                   Subject("a", ["/d/a.nii.gz"])]
    assert read_filelist(model_dir, "val") == ["b", "a"]
    assert not filelists_written(model_dir)  # train and test are missing


@pytest.mark.parametrize("read", [filelist_subjects, read_filelist])
def test_a_missing_list_is_one_line_naming_it(tmp_path, read):
    model_dir = ModelDir(str(tmp_path))
    with pytest.raises(DataError, match="file list not found; run `medseg convert` or `medseg train`") as error:
        read(model_dir, "test")
    assert str(error.value).startswith(model_dir.filelist("test")) and "\n" not in str(error.value)
