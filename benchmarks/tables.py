"""The benchmark tables of docs/benchmarks.md, generated from the raw JSON lines in benchmarks/results/.

Each table sits in docs/benchmarks.md between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; NAME is a
results file (benchmarks/results/NAME.jsonl), every line of which becomes one row, in file order.
`python benchmarks/tables.py` rewrites the page's tables; `tests/integration/test_docs.py` fails when the
page disagrees with the results files. Figures are rounded here, never typed in.

    python benchmarks/tables.py            # rewrite docs/benchmarks.md
    python benchmarks/tables.py --check    # exit 1 if docs/benchmarks.md is stale
"""
import argparse
import json
import os
import re
import sys

from harness import REPO, RESULTS_DIR

PAGE = os.path.join(REPO, "docs", "benchmarks.md")  # the file the tables are written into
TABLE = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)


def _dice(value):
    return "-" if value is None else f"{value:.4f}"


def _spread(r, digits):
    """'value (min-max)' of a benchmark line."""
    return f"{r['value']:.{digits}f} ({r['min']:.{digits}f}-{r['max']:.{digits}f})"


def _when(r):
    """'machine, date' of a benchmark line."""
    return f"{r['machine']}, {r['date']}"


def _ratios(r, prefix):
    """'name 1.5x, ...' of the line's keys `<prefix><name>` (ratios against each peer), or None."""
    return ", ".join(f"{k[len(prefix):]} {v}x" for k, v in r.items() if k.startswith(prefix)) or None


def _own_venv(r):
    """'yes' when the line's library ran in its own environment (benchmarks/venvs.sh): only then is its
    peak RSS its own."""
    return "yes" if r.get("isolated") else "no"


def accuracy_cells(r):
    curve = ", ".join(f"{step}: {dice:.3f}" for step, dice in r["curve_test_dice"])
    return [r["network"], " ".join(r["settings"]) or "planned", r["steps"], r["minutes"], r["step_time_s"],
            r["test_cases"], f"{r['dice_anterior']:.4f} / {r['dice_posterior']:.4f}", f"{r['mean_dice']:.4f}", curve,
            f"{r['assd_mm_anterior']:.2f} / {r['assd_mm_posterior']:.2f}",
            f"{r['hd95_mm_anterior']:.2f} / {r['hd95_mm_posterior']:.2f}"]


def cv_cells(r):
    decision = r["postprocessing"]
    steps = [name for name, on in (("foreground LCC", decision["foreground_largest_component"]),
                                   (f"LCC of classes {decision['largest_component_classes']}",
                                    decision["largest_component_classes"]),
                                   (f"islands < {decision['min_island_mm3']} mm^3", decision["min_island_mm3"]))
             if on] or ["none"]
    return [f"{r['folds']} x {r['steps_per_fold']}",
            f"{_dice(r['cv_mean_dice'])} ({', '.join(f'{d:.3f}' for d in r['cv_mean_dice_per_fold'])})",
            _dice(r["cv_mean_dice_postprocessed"]), "; ".join(steps),
            ", ".join(f"{d:.3f}" for d in r["test_mean_dice_per_fold"]), _dice(r["test_mean_dice_ensemble"]),
            _dice(r["test_mean_dice_ensemble_postprocessed"]),
            f"{r['export_s_per_volume']} / {r['predictor_s_per_volume']}", r["export_labels_identical"]]


def gpu_workflow_cells(r):
    return [r["precision"], "yes" if r["evaluator_beside"] else "no", f"{r['steps_per_s']:.2f}",
            r["checkpoints_evaluated"], f"{r['peak_rss_mb_trainer']:.0f} / {r.get('peak_rss_mb_evaluator', '-')}",
            " ".join(r["settings"])]


def input_pipeline_cells(r):
    library = r["library"] + "".join(f" ({r[key]})" for key in ("mode", "label") if key in r)
    return [r["workload"], library, _spread(r, 1), _ratios(r, "ratio_") or r.get("ratio", "-")]


def sliding_window_cells(r):
    ratios = [" / ".join(str(r.get(f"{key}_vs_{peer}", "-")) for peer in ("monai", "torchio"))
              for key in ("speedup", "windowing_speedup", "peak_rss_ratio")]
    return [r["workload"], r["blending"], r["library"], _spread(r, 3), r.get("probabilities_s", "-"),
            r.get("network_s", "-"), r.get("windowing_s", "-"), f"{r['peak_rss_mb']:.0f}", *ratios, _own_venv(r)]


def metrics_cells(r):
    diffs = ", ".join(f"{k} {v:.2g}" for k, v in r.get("max_rel_diff", {}).items()) or "-"
    return [r["library"], _spread(r, 3), f"{r['anisotropic']['value']:.3f}", r.get("ratio", "-"), diffs]


def augmentation_cells(r):
    return [r["library"], _spread(r, 2), f"{r['first_call_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
            _ratios(r, "speedup_vs_") or "-", _own_venv(r)]


def training_step_cells(r):
    return [r["library"], r["precision"], "yes" if r["jit_compile"] else "no", _spread(r, 2),
            f"{r['step_time_s']:.2f}", r.get("speedup_vs_monai", "-"), r.get("speedup_vs_monai_same_precision", "-"),
            f"{r['peak_rss_mb']:.0f}", _own_venv(r)]


def training_profile_cells(r):
    ops = ", ".join(f"{name.replace('_MklNative', '')} {share:.0%}"
                    for name, share in list((r.get("top_op_types") or {}).items())[:5])
    return [r["precision"], *(f"{r[key]:.3f}" for key in ("step_s", "forward_s", "loss_s", "backward_s",
                                                          "optimizer_s", "metric_s", "step_norm_none_s")),
            f"{r['instance_norm_share']:.0%}", ops or "-"]


def training_cells(r):
    return [r["network"], r["precision"], _spread(r, 2), f"{r['step_time_s']:.2f}", f"{r['data_wait_fraction']:.1%}"]


def brats_cells(r):
    chosen = r["planned"]
    minutes, rss = (" / ".join(str(r[key][stage]) for stage in ("convert", "train", "evaluate"))
                    for key in ("minutes", "peak_rss_mb"))
    dice = ", ".join(f"{name} {value:.3f}" for name, value in r["val_dice"].items())
    return [f"planned {chosen['base_filters']}-filter U-Net", r["steps"],
            f"{chosen['patch_size']}, {chosen['batch_size']}", chosen["depth"], chosen["normalization"], minutes, rss,
            r["val_subjects"], dice, f"{r['val_mean_dice']:.3f}"]


def _w8_cell(r):
    """What a W8 line adds: ours against each peer (speed-up, peak RSS ratio, fraction of equal labels), the window
    of the planned network, or whether `medseg predict` met its RSS target; '-' on the other lines."""
    peers = [key[len("speedup_vs_"):] for key in r if key.startswith("speedup_vs_")]
    if r["workload"] == "W8" and peers:
        return "; ".join(f"{peer}: {r[f'speedup_vs_{peer}']}x, RSS x{r[f'peak_rss_ratio_vs_{peer}']}, labels agree "
                         f"{r[f'labels_agree_with_{peer}']:.4f}" for peer in peers)
    if "planned_patch" in r:
        return (f"window {'x'.join(map(str, r['window']))} (planned patch {'x'.join(map(str, r['planned_patch']))}), "
                f"{r['precision']}")
    if "meets_rss_target" in r:
        return f"RSS <= {r['rss_target_mb']} MB: {'yes' if r['meets_rss_target'] else 'no'}"
    return "-"


def scale_cells(r):
    disk = f"{r['disk_mb']:.0f} / {r['source_mb']:.0f}" if "disk_mb" in r else "-"
    slope = f"{r['slope_mb_per_case']:+.2f}" if "slope_mb_per_case" in r else "-"
    passed = {True: "passed", False: "failed"}.get(r.get("passed"), "-")
    return [r["workload"], r["library"], r["label"], r["stage"], passed, r["cases"], "x".join(map(str, r["shape"])),
            r["peak_rss_mb"], slope, r["seconds"], r.get("patches_per_s", "-"), disk, _w8_cell(r)]


def demo_cells(r):
    dice = " / ".join(f"{r['val_dice'][name]:.3f}" for name in ("anterior", "posterior"))
    return [r["workload"], r["label"], dice, f"{r['val_mean_dice']:.3f}", r["val_subjects"]]


def storage_cells(r):
    return [r["format"], f"{r['cases']} x {'x'.join(map(str, r['shape']))}", r["mb_per_case"], r["of_source"],
            r["read_case_s"], r["read_box_s"]]


def regions_cells(r):
    """A BraTS run scored as regions (Dice / HD95 per region), or a hippocampus run on dense or sparse labels."""
    if r["workload"] == "brats":
        scores = "; ".join(f"{name} {s['dice']:.3f} / {s['hd95_mm']:.1f}" for name, s in r["scored_as_regions"].items())
        return ["BraTS", f"trained on {r['trained_on']}", r["steps"], r["train_minutes"], r["step_time_s"],
                f"{len(r['held_out'])} held-out subjects", scores]
    dice = ", ".join(f"{name} {value:.4f}" for name, value in r["dice"].items())
    return ["hippocampus", f"{r['annotation']} labels ({r['labelled_voxel_fraction']:.0%} of the voxels)", r["steps"],
            r["train_minutes"], r["step_time_s"], f"{r['test_cases']} test cases",
            f"mean Dice {r['mean_dice']:.4f} ({dice})"]


def deploy_cells(r):
    """One runner (Predictor, SavedModel, ONNX runner, or the whole `medseg predict` command) on one workload."""
    shapes = r["shapes"]
    volumes = f"{r['cases']} {r['split']} cases, {'x'.join(map(str, shapes[0][:3]))}"
    volumes += " ..." if len(shapes) > 1 else ""
    if r["runner"] == "predict_cli":
        return [r["workload"], "medseg predict (whole command)", volumes, f"{r['value']} (total {r['total_s']} s)",
                "", r["peak_rss_mb"], "", "", r.get("commit", "")]
    return [r["workload"], r["runner"], volumes, r["value"], r["first_s"], r["peak_rss_mb"],
            r.get("export_s", ""), r["labels_differ_from_predictor"], r.get("commit", "")]


# results name -> (column titles before "machine, date", the cells of one line in that order)
RENDERERS = {
    "hippocampus_accuracy": (["network", "settings", "steps", "minutes", "s/step", "test cases",
                              "Dice anterior / posterior", "mean Dice", "learning curve (step: Dice)", "ASSD mm",
                              "HD95 mm"], accuracy_cells),
    "hippocampus_cv": (["folds x steps", "CV mean Dice (per fold)", "CV after post-processing", "decision",
                        "test Dice per fold", "test Dice, ensemble", "ensemble after post-processing",
                        "export / predict s per volume", "labels identical"], cv_cells),
    "gpu_workflow": (["precision", "evaluator beside", "steps/s", "checkpoints evaluated",
                      "peak RSS trainer / evaluator MB", "settings"], gpu_workflow_cells),
    "input_pipeline": (["workload", "library", "patches/s (min-max)", "ours / theirs"], input_pipeline_cells),
    "sliding_window": (["workload", "blending", "library", "s/volume (min-max)", "with softmax s", "network alone s",
                        "windowing s (without the network)", "peak RSS MB", "speed-up vs MONAI / TorchIO",
                        "windowing speed-up vs MONAI / TorchIO", "RSS vs MONAI / TorchIO", "own venv"],
                       sliding_window_cells),
    "metrics": (["library", "s/subject, 1 mm (min-max)", "s/subject, anisotropic", "peer / ours",
                 "largest relative difference to ours"], metrics_cells),
    "augmentation": (["library", "s/volume (min-max)", "first call s", "peak RSS MB", "ours / theirs", "own venv"],
                     augmentation_cells),
    "training_step": (["library", "precision", "XLA", "patches/s (min-max)", "s/step", "ours / MONAI float32",
                       "ours / MONAI same precision", "peak RSS MB", "own venv"], training_step_cells),
    "training_profile": (["precision", "step s", "forward s", "loss s", "backward s", "optimizer s", "metric s",
                          "step without norm s", "instance-norm share", "top op types (share of op time)"],
                         training_profile_cells),
    "training": (["network", "precision", "patches/s (min-max)", "s/step", "input wait"], training_cells),
    "brats_end_to_end": (["experiment", "steps", "patch, batch", "depth", "normalisation",
                          "minutes convert / train / evaluate", "peak RSS MB convert / train / evaluate",
                          "validation subjects", "validation Dice per class", "mean Dice"], brats_cells),
    "scale": (["workload", "library", "code", "stage", "W7 stage", "cases", "voxels per case",
               "peak RSS MB (process tree)", "MB per added case (fit over the cases)", "seconds", "patches/s",
               "disk / source MB",
               "W8: ours vs each peer (speed-up, RSS ratio, labels agree), planned window, predict's RSS target"],
              scale_cells),
    "demo": (["run", "code", "Dice anterior / posterior", "mean Dice", "validation cases"], demo_cells),
    "regions": (["data", "run", "steps", "train minutes", "s/step", "scored on", "Dice / HD95 mm"], regions_cells),
    "deploy": (["workload", "runner", "volumes", "s/volume (median)", "first volume s", "peak RSS MB", "export s",
                "labels differing from the Predictor", "commit"], deploy_cells),
    "storage": (["format", "cases", "MB per case", "of the source .nii.gz", "read a case s", "read a 96^3 box s"],
                storage_cells),
}


def table_rows(name, lines):
    """The markdown lines of the table `name`: header, separator, one row per results line, each ending with
    its machine and date."""
    columns, cells = RENDERERS[name]
    columns = [*columns, "machine, date"]
    rows = ["| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"]
    return rows + ["| " + " | ".join(str(cell) for cell in [*cells(r), _when(r)]) + " |" for r in lines]


def render(name):
    """The markdown table of benchmarks/results/<name>.jsonl (one row per line), or a line saying it is missing."""
    path = os.path.join(RESULTS_DIR, f"{name}.jsonl")
    if not os.path.isfile(path):
        return f"(no results yet: {os.path.relpath(path, REPO)} is written by its benchmark)\n"
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return "\n".join(table_rows(name, lines)) + "\n"


def regenerate(text):
    """`text` (docs/benchmarks.md) with every table block replaced by its rendering."""
    return TABLE.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is not up to date")
    args = parser.parse_args()
    with open(PAGE) as f:
        text = f.read()
    fresh = regenerate(text)
    if args.check:
        sys.exit(0 if fresh == text else 1)
    with open(PAGE + ".tmp", "w") as f:
        f.write(fresh)
    os.replace(PAGE + ".tmp", PAGE)


if __name__ == "__main__":
    main()
