"""A full disk and exhausted memory are told apart wherever they can occur: training (checkpoints, logs,
params), the evaluator's reports, predict's label maps, the model folder; each is one line naming the folder
(with its free space) or the memory setting to lower, and leaves no partial file behind."""
import errno
import os
import re
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf
import yaml

from helpers import REPO, synthetic_dataset, tiny_params
from medseg_dl.data.convert import convert_dataset
from medseg_dl.errors import DiskFullError, OutOfMemoryError
from medseg_dl.evaluation import report, watcher
from medseg_dl.experiment.experiment import open_model_dir
from medseg_dl.inference import predict
from medseg_dl.inference.predictor import Predictor
from medseg_dl.runtime import atomic
from medseg_dl.training import loop as training
from medseg_dl.training import reporting

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
TF_ENOSPC = tf.errors.ResourceExhaustedError(None, None, "/x/ckpt-5.index; No space left on device")
TF_OOM = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[2,4,12,12,12]")
DISK_FULL = r"the disk is full \(\d+ MB free\) while writing"


def experiment(tmp_path, model_dir, **training_keys):
    """A converted tiny experiment: params file path (records outside `model_dir`)."""
    root = synthetic_dataset(tmp_path / "data")
    values = tiny_params(root, model_dir, training={"steps": 20, **training_keys})
    values["data"]["converted_dir"] = str(tmp_path / "records")
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_is_disk_full_reads_oserrors_and_tensorflow_errors():
    assert atomic.is_disk_full(ENOSPC) and atomic.is_disk_full(OSError(errno.EDQUOT, "quota"))
    assert atomic.is_disk_full(TF_ENOSPC)
    assert not atomic.is_disk_full(TF_OOM) and not atomic.is_disk_full(OSError(errno.EACCES, "denied"))


def _can_mount_tmpfs():
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


NEEDS_TMPFS = pytest.mark.skipif(not shutil.which("unshare") or not _can_mount_tmpfs(),
                                 reason="needs `unshare -rm` and tmpfs mounts (a user and mount namespace)")


def _train_on_a_small_tmpfs(tmp_path, prepare, resume=None, **training_keys):
    """Real processes on a tmpfs at tmp_path/mnt in a private mount namespace: `prepare` (shell, with $MNT and
    $TRAIN, the train command of a new 20-step experiment) mounts it small; then `resume` (default $TRAIN) runs
    until the disk is full (first.*: stderr, rc, checkpoint listing and state), the tmpfs is enlarged to 20 MB
    and `resume` runs again (second.*). Returns the mount folder and the last line of the first run's stderr."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    path = experiment(tmp_path, mount / "run", checkpoint_every=5, keep_last=2, **training_keys)
    convert_dataset(open_model_dir(path, [f"experiment.model_dir={tmp_path / 'converted'}"])[0])
    train = f"{sys.executable} {os.path.join(REPO, 'train.py')} --params {path}"
    resume = resume or train
    script = (f"MNT={mount}; TRAIN='{train}'; {prepare} && {{ {resume} 2> {tmp_path}/first.err; "
              f"echo $? > {tmp_path}/first.rc; ls {mount}/run/checkpoints > {tmp_path}/first.ls; "
              f"cat {mount}/run/checkpoints/checkpoint > {tmp_path}/first.state; "
              f"mount -o remount,size=20m {mount} && {resume} > {tmp_path}/second.out 2>&1; echo $? > "
              f"{tmp_path}/second.rc; ls {mount}/run/checkpoints > {tmp_path}/second.ls; }}")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                   timeout=400, check=True)
    return mount, (tmp_path / "first.err").read_text().strip().splitlines()[-1]


def _check_stopped_then_resumed(tmp_path, mount, first_error):
    """The first run stopped with the disk-full line and left no unlisted checkpoint file; the second finished.
    Returns the checkpoints the first run listed."""
    assert (tmp_path / "first.rc").read_text().strip() == "2", first_error
    assert re.fullmatch(rf"medseg train: error: {mount}/run: {DISK_FULL} checkpoints or logs; free disk space, "
                        rf"then resume with --params {mount}/run/params.yaml", first_error), first_error
    left = (tmp_path / "first.ls").read_text().split()
    assert not [n for n in left if n.endswith("_temp")]
    listed = set(re.findall(r'all_model_checkpoint_paths: "(ckpt-\d+)"', (tmp_path / "first.state").read_text()))
    assert {n.split(".")[0] for n in left if n.startswith("ckpt-")} == listed  # no partial checkpoint left
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.out").read_text()
    assert "ckpt-20.index" in (tmp_path / "second.ls").read_text().split()
    return listed


@NEEDS_TMPFS
def test_a_full_disk_met_by_the_summary_writer_is_reported_and_training_resumes_once_space_is_freed(tmp_path):
    """30 KB: the first event file (the traced graph) does not fit. TensorFlow raises ResourceExhaustedError,
    the class of an out-of-memory error; the trainer tells it apart."""
    mount, first_error = _train_on_a_small_tmpfs(tmp_path, "mount -t tmpfs -o size=30k tmpfs $MNT")
    assert _check_stopped_then_resumed(tmp_path, mount, first_error) == set()


@NEEDS_TMPFS
def test_a_full_disk_met_by_a_checkpoint_save_is_reported_and_training_resumes_once_space_is_freed(tmp_path):
    """The tmpfs is sized from what this machine writes: 5 steps are trained on a roomy one, which is then
    shrunk to its use plus half a checkpoint, so the run resumed to 20 steps meets the full disk at its step-10
    save (nothing else is written between steps 5 and 10); the partial files are removed, ckpt-5 stays listed."""
    prepare = ("mount -t tmpfs -o size=20m tmpfs $MNT && $TRAIN --set training.steps=5 > /dev/null 2>&1 && "
               "used=$(df -B1 --output=used $MNT | tail -1) && ckpt=$(cat $MNT/run/checkpoints/ckpt-5.* | wc -c) && "
               "mount -o remount,size=$((used + ckpt / 2)) $MNT")
    resume = f"{sys.executable} {os.path.join(REPO, 'train.py')} --params {tmp_path}/mnt/run/params.yaml " \
             f"--set training.steps=20"
    mount, first_error = _train_on_a_small_tmpfs(tmp_path, prepare, resume, log_every=20, image_summary_every=20)
    assert _check_stopped_then_resumed(tmp_path, mount, first_error) == {"ckpt-5"}


def test_a_failed_checkpoint_save_on_a_full_disk_removes_its_partial_files(tmp_path, monkeypatch):
    params, model_dir, _ = open_model_dir(experiment(tmp_path, tmp_path / "run", checkpoint_every=5))
    convert_dataset(params)
    real_save = tf.train.CheckpointManager.save

    def save_cut_short(manager, checkpoint_number=None, **kwargs):
        if checkpoint_number == 10:  # part of the files appear, the checkpoint state is never updated
            for name in ("ckpt-10.index", "ckpt-10.data-00000-of-00001", "ckpt-10_temp/part"):
                os.makedirs(os.path.dirname(os.path.join(manager.directory, name)), exist_ok=True)
                open(os.path.join(manager.directory, name), "wb").write(b"\0" * 100)
            raise TF_ENOSPC
        return real_save(manager, checkpoint_number=checkpoint_number, **kwargs)
    monkeypatch.setattr(tf.train.CheckpointManager, "save", save_cut_short)
    with pytest.raises(DiskFullError, match=rf"^{re.escape(model_dir.root)}: {DISK_FULL} checkpoints or logs"):
        training.run_training(params, model_dir)
    assert sorted(n for n in os.listdir(model_dir.checkpoints) if n.startswith("ckpt-")) == [
        "ckpt-5.data-00000-of-00001", "ckpt-5.index"]  # ckpt-10's files and its _temp folder are gone
    assert not os.path.exists(model_dir.done_marker)


def test_oserror_enospc_while_logging_is_a_full_disk_and_oom_is_out_of_memory(tmp_path, monkeypatch):
    params, model_dir, _ = open_model_dir(experiment(tmp_path, tmp_path / "run", log_every=2))
    convert_dataset(params)

    def full(self, row):
        raise ENOSPC
    monkeypatch.setattr(reporting.ScalarCsv, "append", full)
    with pytest.raises(DiskFullError, match=rf"^{re.escape(model_dir.root)}: {DISK_FULL} checkpoints or logs"):
        training.run_training(params, model_dir)
    monkeypatch.undo()

    def exhausted(strategy, spec, jit_compile):
        def step(batch, stop):
            raise TF_OOM
        return step
    monkeypatch.setattr(training, "make_train_step", exhausted)
    with pytest.raises(OutOfMemoryError, match="out of memory .* lower sampling.batch_size"):
        training.run_training(params, model_dir)


def test_a_full_disk_while_preparing_the_model_folder_names_it(tmp_path, monkeypatch):
    path = experiment(tmp_path, tmp_path / "run")

    def full(path, text):
        raise ENOSPC
    monkeypatch.setattr(atomic, "write_text", full)
    with pytest.raises(DiskFullError, match=rf"^{re.escape(str(tmp_path / 'run'))}: {DISK_FULL} the params"):
        open_model_dir(path)


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("trained")
    params, model_dir, _ = open_model_dir(experiment(tmp_path, tmp_path / "run", steps=5))
    convert_dataset(params)
    training.run_training(params, model_dir)
    return params, model_dir, tmp_path


def test_the_evaluator_on_a_full_disk_names_eval_and_writes_no_partial_report(trained_folder, monkeypatch):
    params, model_dir, _ = trained_folder
    real_write = report._write_csv

    def full(path, rows):  # half of the rows, then the disk is full
        real_write(path, rows[:1])
        raise ENOSPC
    monkeypatch.setattr(report, "_write_csv", full)
    with pytest.raises(DiskFullError, match=rf"^{re.escape(model_dir.report_dir(5))}: {DISK_FULL} this report"):
        watcher.run_evaluation(params, model_dir, once=True)
    assert not os.path.exists(model_dir.report_dir(5))
    assert not [n for n in os.listdir(model_dir.eval_root) if n.startswith((".tmp-", "staging-"))]


def test_predict_on_a_full_disk_names_the_output_folder(trained_folder, monkeypatch, tmp_path):
    params, model_dir, data_root = trained_folder

    def full(path, data, affine, header=None):
        raise ENOSPC
    monkeypatch.setattr(predict, "write_volume", full)
    output = tmp_path / "out"
    with pytest.raises(DiskFullError, match=rf"^{re.escape(str(output))}: {DISK_FULL} the label maps"):
        predict.run_prediction(model_dir.root, "latest", [str(data_root / "data" / "images")], str(output))


def test_out_of_memory_while_segmenting_is_one_line(trained_folder, monkeypatch):
    params, model_dir, _ = trained_folder

    def exhausted(self, *args):
        raise TF_OOM
        yield  # a generator, as the method it replaces
    monkeypatch.setattr(Predictor, "_slabs_checked", exhausted)
    with pytest.raises(OutOfMemoryError, match=r"while segmenting a volume of 20 x 20 x 20 voxels into 3 classes; "
                                               r"lower evaluation.batch_size"):
        watcher.run_evaluation(params, model_dir, once=True)


def test_export_on_a_full_disk_names_the_savedmodel_folder_and_leaves_none(trained_folder, monkeypatch, tmp_path):
    import keras
    from medseg_dl.inference.export import run_export

    params, model_dir, _ = trained_folder

    def full(archive, folder, **kwargs):  # part of the SavedModel is written, then the disk is full
        os.makedirs(folder)
        open(os.path.join(folder, "saved_model.pb"), "wb").write(b"\0" * 10)
        raise TF_ENOSPC
    monkeypatch.setattr(type(keras.export.ExportArchive()), "write_out", full)  # the backend's class
    output = tmp_path / "savedmodel"
    with pytest.raises(DiskFullError, match=rf"^{re.escape(str(output))}: {DISK_FULL} the SavedModel"):
        run_export(model_dir.root, "latest", str(output))
    assert os.listdir(tmp_path) == []
