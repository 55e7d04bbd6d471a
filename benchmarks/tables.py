"""The README's benchmark tables, generated from the raw JSON lines in benchmarks/results/.

Each table sits in README.md between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; NAME is a
results file (benchmarks/results/NAME.jsonl), every line of which becomes one row, in file order.
`python benchmarks/tables.py` rewrites the README's tables; `tests/test_readme.py` fails when the
README disagrees with the results files. Figures are rounded here, never typed in.

    python benchmarks/tables.py            # rewrite README.md
    python benchmarks/tables.py --check    # exit 1 if README.md is stale
"""
import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
README = os.path.join(REPO, "README.md")
TABLE = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)


def _dice(value):
    return "-" if value is None else f"{value:.4f}"


def accuracy_rows(lines):
    header = ("| network | steps | minutes | s/step | test cases | Dice anterior / posterior | mean Dice | "
              "learning curve (step: Dice) | ASSD mm | HD95 mm | machine, date |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [header]
    for r in lines:
        curve = ", ".join(f"{step}: {dice:.3f}" for step, dice in r["curve_test_dice"])
        rows.append(f"| {r['network']} | {r['steps']} | {r['minutes']} | {r['step_time_s']} | {r['test_cases']} | "
                    f"{r['dice_anterior']:.4f} / {r['dice_posterior']:.4f} | {r['mean_dice']:.4f} | {curve} | "
                    f"{r['assd_mm_anterior']:.2f} / {r['assd_mm_posterior']:.2f} | "
                    f"{r['hd95_mm_anterior']:.2f} / {r['hd95_mm_posterior']:.2f} | {r['machine']}, {r['date']} |")
    return rows


def cv_rows(lines):
    header = ("| folds x steps | CV mean Dice (per fold) | CV after post-processing | decision | test Dice per fold | "
              "test Dice, ensemble | ensemble after post-processing | export / predict s per volume | "
              "labels identical | machine, date |\n|---|---|---|---|---|---|---|---|---|---|")
    rows = [header]
    for r in lines:
        decision = r["postprocessing"]
        steps = [name for name, on in (("foreground LCC", decision["foreground_largest_component"]),
                                       (f"LCC of classes {decision['largest_component_classes']}",
                                        decision["largest_component_classes"]),
                                       (f"islands < {decision['min_island_mm3']} mm^3", decision["min_island_mm3"]))
                 if on] or ["none"]
        rows.append(f"| {r['folds']} x {r['steps_per_fold']} | {_dice(r['cv_mean_dice'])} "
                    f"({', '.join(f'{d:.3f}' for d in r['cv_mean_dice_per_fold'])}) | "
                    f"{_dice(r['cv_mean_dice_postprocessed'])} | {'; '.join(steps)} | "
                    f"{', '.join(f'{d:.3f}' for d in r['test_mean_dice_per_fold'])} | "
                    f"{_dice(r['test_mean_dice_ensemble'])} | {_dice(r['test_mean_dice_ensemble_postprocessed'])} | "
                    f"{r['export_s_per_volume']} / {r['predictor_s_per_volume']} | {r['export_labels_identical']} | "
                    f"{r['machine']}, {r['date']} |")
    return rows


def gpu_workflow_rows(lines):
    rows = ["| precision | evaluator beside | steps/s | checkpoints evaluated | peak RSS trainer / evaluator MB | "
            "settings | machine, date |\n|---|---|---|---|---|---|---|"]
    for r in lines:
        rows.append(f"| {r['precision']} | {'yes' if r['evaluator_beside'] else 'no'} | {r['steps_per_s']:.2f} | "
                    f"{r['checkpoints_evaluated']} | {r['peak_rss_mb_trainer']:.0f} / "
                    f"{r.get('peak_rss_mb_evaluator', '-')} | {' '.join(r['settings'])} | {r['machine']}, {r['date']} |")
    return rows


RENDERERS = {"hippocampus_accuracy": accuracy_rows, "hippocampus_cv": cv_rows, "gpu_workflow": gpu_workflow_rows}


def render(name):
    """The markdown table of benchmarks/results/<name>.jsonl (one row per line), or a line saying it is missing."""
    path = os.path.join(RESULTS, f"{name}.jsonl")
    if not os.path.isfile(path):
        return f"(no results yet: {os.path.relpath(path, REPO)} is written by its benchmark)\n"
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return "\n".join(RENDERERS[name](lines)) + "\n"


def regenerate(text):
    """`text` (README.md) with every table block replaced by its rendering."""
    return TABLE.sub(lambda m: m.group(1) + render(m.group(2)) + m.group(4), text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = parser.parse_args()
    with open(README) as f:
        text = f.read()
    fresh = regenerate(text)
    if args.check:
        sys.exit(0 if fresh == text else 1)
    with open(README + ".tmp", "w") as f:
        f.write(fresh)
    os.replace(README + ".tmp", README)


if __name__ == "__main__":
    main()
