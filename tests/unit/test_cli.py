"""The `medseg` command: a user mistake is one line on stderr naming the file and the fix, exit code 2, no
traceback, and nothing written."""
import json
import os
import subprocess
import sys

import numpy as np

from helpers import REPO, hippo_params, synthetic_case, write_nifti


ENV = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}


def test_cli_reports_error_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rat: 0.1\n")
    result = subprocess.run([sys.executable, "-m", "medseg_dl.cli", "convert", "--params", str(bad)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "did you mean training.learning_rate?" in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr


def medseg_failing(*args):
    """Run `medseg ARGS` expecting a user error: returns stderr after checking exit 2 and no traceback."""
    result = subprocess.run([sys.executable, "-m", "medseg_dl.cli", *args], capture_output=True, text=True,
                            cwd=REPO, env=ENV, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_cli_2d_image(tmp_path):
    synthetic_case(tmp_path / "d", image=np.random.rand(8, 47).astype(np.float32))
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps(hippo_params(tmp_path / "d", tmp_path / "run", data={"split": {"val": 0.0}})))
    stderr = medseg_failing("convert", "--params", str(params))
    assert "images/case.nii.gz: image of shape (8, 47); medseg_dl segments 3D volumes" in stderr


def test_cli_predict_output_is_a_file(tmp_path):
    """Refused before any work: the model folder does not even exist, and the file is left as it was."""
    write_nifti(tmp_path / "image.nii.gz", np.random.rand(8, 9, 10).astype(np.float32))
    output = tmp_path / "out.nii.gz"
    output.write_bytes(b"keep me")
    stderr = medseg_failing("predict", "--model-dir", str(tmp_path / "no_model"), "--input",
                            str(tmp_path / "image.nii.gz"), "--output", str(output))
    assert f"{output}: the output is a file; give a folder for the label maps" in stderr
    assert output.read_bytes() == b"keep me"
