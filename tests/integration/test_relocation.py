"""A model folder can be moved (`mv`) or copied (`cp -a`): in its new place it resumes, evaluates, predicts
and exports, and never writes to the old one. A moved data folder with the same subjects is followed; one
with other subjects is refused before anything is written. `medseg convert` needs no cluster."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, synthetic_dataset, tiny_params
from medseg_dl.config.params import Params


def medseg(*args, cwd=None):
    """Run `medseg ARGS` in a new process; returns (exit code, stdout + stderr)."""
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-m", "medseg_dl.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=400)
    return done.returncode, done.stdout + done.stderr


def tree(root):
    """{relative path: (size, mtime_ns)} of every file below `root`."""
    return {os.path.relpath(os.path.join(folder, name), root): (os.stat(os.path.join(folder, name)).st_size,
                                                                os.stat(os.path.join(folder, name)).st_mtime_ns)
            for folder, _, names in os.walk(root) for name in names}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """runs/a: 10 steps trained with relative paths from the working directory `tmp`."""
    tmp = tmp_path_factory.mktemp("relocation")
    synthetic_dataset(tmp / "data")
    values = tiny_params("data", "runs/a", training={"steps": 10})
    (tmp / "exp.yaml").write_text(yaml.safe_dump(values))
    code, output = medseg("train", "--params", "exp.yaml", cwd=tmp)
    assert code == 0, output
    return tmp


def test_the_saved_params_hold_the_paths_inside_the_folder_relative_to_it(trained_run):
    saved = yaml.safe_load((trained_run / "runs" / "a" / "params.yaml").read_text())
    assert saved["experiment"]["model_dir"] == "." and saved["data"]["converted_dir"] == "converted"
    assert saved["data"]["source_dir"] == str(trained_run / "data")  # outside: absolute
    run_params = yaml.safe_load((trained_run / "runs" / "a" / "checkpoints" / "run_params.yaml").read_text())
    assert run_params["experiment"]["model_dir"] == "." and run_params["data"]["converted_dir"] == "converted"
    loaded = Params.load(str(trained_run / "runs" / "a" / "params.yaml"))  # from any working directory
    assert loaded.experiment.model_dir == str(trained_run / "runs" / "a")
    assert loaded.data.converted_dir == str(trained_run / "runs" / "a" / "converted")


@pytest.mark.parametrize("how", ["mv", "cp -a"])
def test_a_moved_or_copied_model_folder_trains_evaluates_predicts_and_exports_in_its_new_place(
        trained_run, tmp_path, how):
    old = tmp_path / "a"
    shutil.copytree(trained_run / "runs" / "a", old, symlinks=True)
    new = tmp_path / "elsewhere" / "b"
    new.parent.mkdir()
    subprocess.run([*how.split(), str(old), str(new)], check=True)
    before = tree(old) if old.exists() else None
    code, output = medseg("train", "--params", str(new / "params.yaml"), "--set", "training.steps=14", cwd=REPO)
    assert code == 0, output
    assert (new / "checkpoints" / "ckpt-14.index").exists()
    assert json.loads((new / "checkpoints" / "done.json").read_text())["step"] == 14
    code, output = medseg("evaluate", "--params", str(new / "params.yaml"), "--once", cwd=REPO)
    assert code == 0, output
    assert (new / "eval" / "14" / "summary.json").exists()
    code, output = medseg("predict", "--model-dir", str(new), "--checkpoint", "latest", "--input",
                          str(trained_run / "data" / "images" / "case_00.nii.gz"), "--output", str(tmp_path / "out"))
    assert code == 0, output
    code, output = medseg("export", "--model-dir", str(new), "--checkpoint", "latest", "--output",
                          str(tmp_path / "savedmodel"))
    assert code == 0, output
    assert json.load(open(tmp_path / "savedmodel" / "metadata.json"))["members"][0]["model_dir"] == \
        str(new)
    if how == "mv":
        assert not old.exists()  # nothing recreated the old folder
    else:
        assert tree(old) == before  # the original is untouched


def test_a_copy_whose_paths_were_edited_to_it_resumes_there(trained_run, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(trained_run / "runs" / "a", copy)
    values = yaml.safe_load((copy / "params.yaml").read_text())
    values["experiment"]["model_dir"] = str(copy)
    values["data"]["converted_dir"] = str(copy / "converted")
    (copy / "params.yaml").write_text(yaml.safe_dump(values))
    code, output = medseg("train", "--params", str(copy / "params.yaml"), "--set", "training.steps=12")
    assert code == 0, output
    assert (copy / "checkpoints" / "ckpt-12.index").exists()


def test_a_moved_data_folder_with_the_same_subjects_is_followed_and_other_subjects_are_refused(trained_run, tmp_path):
    run = tmp_path / "a"
    shutil.copytree(trained_run / "runs" / "a", run)
    data = tmp_path / "moved-data"
    shutil.copytree(trained_run / "data", data)
    other = tmp_path / "other-data"
    shutil.copytree(trained_run / "data", other)
    with open(other / "labels" / "case_01.nii.gz", "ab") as f:
        f.write(b"\0")  # a different file of the same name
    before = tree(run)
    code, output = medseg("train", "--params", str(run / "params.yaml"), "--set", f"data.source_dir={other}",
                          "--set", "training.steps=12")
    assert code == 2 and output.strip().splitlines()[-1].startswith(f"medseg train: error: {other}: not the data of "
                                                                    f"{run} (case_01: file sizes "), output
    assert tree(run) == before
    code, output = medseg("train", "--params", str(run / "params.yaml"), "--set", f"data.source_dir={data}",
                          "--set", "training.steps=12")
    assert code == 0, output
    assert f"resume: data.source_dir: '{trained_run / 'data'}' -> '{data}'" in output
    assert f"data: the 4 subjects of the file lists are now read from {data}" in output
    for split in ("train", "val", "test"):
        for entry in json.loads((run / "filelists" / f"{split}.json").read_text()):
            assert all(path.startswith(str(data)) for path in entry["channels"] + [entry["label"]])
    code, output = medseg("evaluate", "--params", str(run / "params.yaml"), "--once")
    assert code == 0, output


def test_convert_needs_no_cluster_for_multi_worker_params(tmp_path):
    synthetic_dataset(tmp_path / "data")
    values = tiny_params(tmp_path / "data", tmp_path / "run", training={"strategy": "multi_worker"})
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(values))
    env_without_cluster = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    done = subprocess.run([sys.executable, "-m", "medseg_dl.cli", "convert", "--params", str(tmp_path / "exp.yaml")],
                          capture_output=True, text=True, env={**env_without_cluster, "PYTHONPATH": REPO}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "converted 4 subjects" in done.stdout
