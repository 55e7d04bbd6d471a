"""Region-based training and sparse annotations on the bundled data (issue 25's measures).

    python benchmarks/regions.py --workload brats --steps 300
    python benchmarks/regions.py --workload sparse --steps 1000

brats: the six BraTS 2015 subjects, with the experiment `medseg plan` writes for them (CPU budget), trained
twice on the same split (pat0003-pat0006 train, pat0001 and pat0002 held out: DeepMedic's test subjects),
steps and seed (the planned experiment without mirroring at test time, which costs 8x on a CPU): once on
BraTS's regions (params/brats.yaml's data.regions: whole tumour {1, 2, 3, 4}, tumour
core {1, 3, 4}, enhancing tumour {4}; one sigmoid each, Dice + binary cross-entropy), once on the five labels
(softmax, Dice + cross-entropy). The label maps `medseg predict` writes for the held-out subjects (painted
regions, or the arg-max) are scored as regions by one function (Dice and HD95 per region, the evaluator's
scoring) against the subjects' reference label maps. Two held-out subjects: a difference of a few Dice
points between the two runs is within what the draw of patches alone moves.

sparse: hippocampus, the planned experiment, 20% of the cases held out by the seeded split; trained on the
dense labels, and on the same training cases with only every third axial slice labelled (the others set to
the ignore label 3), same steps; both scored densely on the held-out cases by the evaluator (its test split).

One JSON line per run, kept in benchmarks/results/regions.jsonl (not with --quick: 4 steps, a smoke run).
"""
import argparse
import json
import os
import shutil
import subprocess
import time

import nibabel as nib
import numpy as np
from datasets import BRATS, BRATS_PATTERNS, HIPPO
from experiments import planned_experiment, score_test_split, step_times_s, train
from harness import MEDSEG, REPO
from machine_info import record

BRATS_HELD_OUT = ["brats_2013_pat0001_1", "brats_2013_pat0002_1"]
SPARSE_IGNORE = 3  # hippocampus: labels 0, 1, 2
EVERY_NTH_SLICE = 3


def brats_regions():
    """data.regions of params/brats.yaml."""
    from medseg_dl.config.params import Params

    return Params.load(os.path.join(REPO, "params", "brats.yaml")).data.regions


def medseg(*arguments):
    """`medseg ARGUMENTS` in a child process from the repository root; SystemExit when it fails."""
    done = subprocess.run([*MEDSEG, *arguments], cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"medseg {arguments[0]} failed with exit code {done.returncode}")


def brats_run(work_dir, steps, regions):
    """Plan, train `steps` on regions or labels, predict the held-out subjects; returns (model dir, minutes,
    predictions folder)."""
    from medseg_dl.planning.command import run_plan

    name = "regions" if regions else "labels"
    model_dir = os.path.join(work_dir, name)
    shutil.rmtree(model_dir, ignore_errors=True)
    train_ids = sorted({os.path.basename(p) for folder in ("train", "validation")
                        for p in os.listdir(os.path.join(BRATS, folder))})
    lists = json.dumps({"train": train_ids, "val": [], "test": BRATS_HELD_OUT})
    overrides = [*BRATS_PATTERNS, f"data.split.lists={lists}", f"experiment.model_dir={model_dir}",
                 f"training.steps={steps}", f"training.checkpoint_every={steps}", "data.workers=1",
                 "evaluation.tta_mirroring=false"]  # 8x the prediction time on a CPU, the same for both runs
    if regions:
        overrides.append(f"data.regions={json.dumps(brats_regions())}")
    params_path = run_plan(BRATS, "subject_folders", os.path.join(work_dir, f"{name}.yaml"), overrides=overrides)
    started = time.time()
    medseg("train", "--params", params_path)
    minutes = (time.time() - started) / 60
    predictions = os.path.join(work_dir, f"{name}-predictions")
    shutil.rmtree(predictions, ignore_errors=True)
    medseg("predict", "--model-dir", model_dir, "--output", predictions, "--input",
           *[os.path.join(BRATS, "test", s) for s in BRATS_HELD_OUT])
    return model_dir, minutes, predictions


def score_as_regions(predictions):
    """{region: {dice, hd95_mm}: means over the held-out subjects} of the label maps in `predictions` against
    the subjects' references, each region the set of label values params/brats.yaml gives it."""
    from medseg_dl.config.params import Params
    from medseg_dl.data.targets import Targets
    from medseg_dl.evaluation import scoring

    targets = Targets.from_params(Params.load(os.path.join(REPO, "params", "brats.yaml")).data)
    rows = []
    for subject in BRATS_HELD_OUT:
        reference = nib.load(os.path.join(BRATS, "test", subject, "OTMultiClass.nii.gz"))
        prediction = nib.load(os.path.join(predictions, f"{subject}.nii.gz"))
        spacing_mm = tuple(float(s) for s in reference.header.get_zooms()[:3])
        rows += scoring.score_case(np.asarray(reference.dataobj, np.uint8), np.asarray(prediction.dataobj, np.uint8),
                                   targets, spacing_mm, 1.0)
    summary = scoring.summarize(rows)["classes"]
    return {name: {"dice": summary[name]["dice"]["mean"], "hd95_mm": summary[name]["hd95_mm"]["mean"]}
            for name, _ in targets.structures}


def measure_brats(args):
    for regions in (True, False):
        model_dir, minutes, predictions = brats_run(args.work, args.steps, regions)
        intervals_s = step_times_s(model_dir)
        record("regions", {"benchmark": "regions", "workload": "brats", "trained_on": "regions" if regions
                           else "labels", "steps": args.steps, "train_minutes": round(minutes, 1),
                           "step_time_s": round(float(np.median(intervals_s)), 3), "held_out": BRATS_HELD_OUT,
                           "scored_as_regions": score_as_regions(predictions)},
               keep=not args.quick)


def axial_axis(affine):
    """The voxel axis that runs most nearly along S-I."""
    return "".join(nib.aff2axcodes(affine)).replace("I", "S").index("S")


def sparse_copy(source_dir, target_dir, train_ids):
    """images/ linked, labels/ of `train_ids` with only every EVERY_NTH_SLICE-th axial slice kept (the rest
    SPARSE_IGNORE), the other subjects' labels linked unchanged; returns the fraction of training voxels kept."""
    shutil.rmtree(target_dir, ignore_errors=True)
    os.makedirs(os.path.join(target_dir, "labels"))
    os.symlink(os.path.join(source_dir, "images"), os.path.join(target_dir, "images"))
    kept = total = 0
    for name in sorted(os.listdir(os.path.join(source_dir, "labels"))):
        source = os.path.join(source_dir, "labels", name)
        subject = name.removesuffix(".nii.gz")
        if subject not in train_ids:
            os.symlink(source, os.path.join(target_dir, "labels", name))
            continue
        image = nib.load(source)
        label = np.asarray(image.dataobj, np.uint8).copy()
        axis = axial_axis(image.affine)
        dropped = np.arange(label.shape[axis]) % EVERY_NTH_SLICE != 0
        np.moveaxis(label, axis, 0)[dropped] = SPARSE_IGNORE
        kept, total = kept + int(np.count_nonzero(label != SPARSE_IGNORE)), total + label.size
        nib.save(nib.Nifti1Image(label, image.affine, image.header), os.path.join(target_dir, "labels", name))
    return kept / total


def measure_sparse(args):
    from medseg_dl.data.subjects import split_subjects

    ids = [name.removesuffix(".nii.gz") for name in os.listdir(os.path.join(HIPPO, "labels"))]
    lists = split_subjects(ids, {"val": 0.0, "test": 0.2}, 42)
    params_path = planned_experiment(HIPPO, args.work)
    fraction = sparse_copy(HIPPO, os.path.join(args.work, "sparse-data"), set(lists["train"]))
    for annotation in ("dense", "sparse"):
        model_dir = os.path.join(args.work, annotation)
        shutil.rmtree(model_dir, ignore_errors=True)
        overrides = [f"experiment.model_dir={model_dir}", f"data.split.lists={json.dumps(lists)}",
                     f"data.converted_dir={os.path.join(args.work, annotation + '-converted')}",
                     f"training.steps={args.steps}", f"training.checkpoint_every={args.steps}"]
        if annotation == "sparse":
            overrides += [f"data.source_dir={os.path.join(args.work, 'sparse-data')}",
                          f"data.ignore_label={SPARSE_IGNORE}"]
        minutes = train(params_path, overrides, None)
        params, summary, _ = score_test_split(model_dir, [])
        record("regions", {"benchmark": "regions", "workload": "sparse", "annotation": annotation,
                           "labelled_voxel_fraction": 1.0 if annotation == "dense" else round(fraction, 4),
                           "steps": summary["step"], "train_minutes": round(minutes, 1),
                           "step_time_s": round(float(np.median(step_times_s(model_dir))), 3),
                           "test_cases": summary["subjects"], "mean_dice": summary["mean_dice"],
                           "dice": {name: stats["dice"]["mean"] for name, stats in summary["classes"].items()}},
               keep=not args.quick)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["brats", "sparse"], required=True)
    parser.add_argument("--steps", type=int, help="training steps of each run (brats: 300, sparse: 1000)")
    parser.add_argument("--work", default="/tmp/medseg_regions")
    parser.add_argument("--quick", action="store_true", help="4 steps, lines printed and not kept: a smoke run")
    args = parser.parse_args()
    args.steps = 4 if args.quick else args.steps or (300 if args.workload == "brats" else 1000)
    args.work = os.path.join(os.path.abspath(args.work), args.workload)
    os.makedirs(args.work, exist_ok=True)
    (measure_brats if args.workload == "brats" else measure_sparse)(args)


if __name__ == "__main__":
    main()
