"""What a resume may change: one rule per params key, checked before anything is written.

The params the checkpoints follow are kept in `checkpoints/run_params.yaml` (ModelDir.run_params),
written by the trainer when it starts. Resuming (`medseg train --params <model_dir>/params.yaml`,
edited by hand or with `--set`) compares the new params with them key by key: a key whose rule is
"applied" takes effect from the resume step and is printed; a key whose rule is "no effect" is printed
with the reason; a key whose rule is "refused" stops the command with one line naming the key, the
reason and the fix, before any file is changed. The
evaluator and `medseg predict` apply the same check to the network-defining keys, so a hand-edited
params.yaml can never build a network the checkpoints do not fit. The resume table of docs/resume.md is
generated from `RULES` (`medseg params-doc --resume`).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from medseg_dl.config import schema
from medseg_dl.config.params import Params, all_keys
from medseg_dl.errors import ModelDirError

APPLIED, REFUSED, NO_EFFECT = "applied", "refused", "no effect"

# (dotted key or section prefix, verdict, what happens or why not); the longest matching prefix wins
RULES: List[Tuple[str, str, str]] = [
    ("seed", REFUSED, "it fixed the split, the conversion and the initial weights"),
    ("experiment", APPLIED, "recorded only (model_dir is the folder itself)"),
    ("data", REFUSED, "it defines the subjects, their split and the converted records"),
    ("data.source_dir", APPLIED, "the data folder may move: it must hold the same subjects (ids, file names and "
                                 "sizes, checked before anything is written); the file lists then point there"),
    ("data.channels", REFUSED, "it fixes the network's input channels"),
    ("data.num_classes", REFUSED, "it fixes the network's outputs"),
    ("data.regions", REFUSED, "it fixes the network's outputs"),
    ("data.ignore_label", REFUSED, "it decides which voxels the converted records' sampling locations and the "
                                   "trained network's losses counted"),
    ("data.class_names", APPLIED, "names in logs and reports from now on"),
    ("data.workers", APPLIED, "conversion processes from now on"),
    ("preprocessing", REFUSED, "the converted records and the trained network depend on it"),
    ("sampling", APPLIED, "the input pipeline is rebuilt at each start"),
    ("augmentation", APPLIED, "the input pipeline is rebuilt at each start"),
    ("model", REFUSED, "it fixes the network's variables in the checkpoints"),
    ("loss", APPLIED, "from the resume step"),
    ("training", APPLIED, "from the resume step"),
    ("training.steps", APPLIED, "the learning rate continues from its current value and decays to 0 at the new "
                                "last step; a stale done marker is removed, so the evaluator follows"),
    ("training.learning_rate", APPLIED, "the schedule restarts from this rate at the resume step"),
    ("training.schedule", APPLIED, "from the current rate at the resume step"),
    ("training.warmup_steps", NO_EFFECT, "warm-up is only at the start of the first run; a resume continues the "
                                         "schedule it restores"),
    ("training.optimizer", REFUSED, "the optimizer's state (moments, momentum) is in the checkpoints"),
    ("training.precision", REFUSED, "mixed_float16's loss-scale state is in the checkpoints (and not in others)"),
    ("evaluation", APPLIED, "read by the evaluator when it starts (restart it to apply)"),
]

# the keys that decide whether a checkpoint fits a network: checked by the evaluator and predict
NETWORK_KEYS = ("model", "data.channels", "data.num_classes", "data.regions", "preprocessing")


@dataclass(frozen=True)
class Change:
    """One changed key: its old and new value, the rule's verdict and its explanation."""

    key: str
    old: object
    new: object
    verdict: str
    why: str

    def describe(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r} ({self.verdict}: {self.why})"


def rule(dotted: str) -> Tuple[str, str]:
    """(verdict, explanation) of the longest `RULES` prefix of a dotted key."""
    matches = [r for r in RULES if dotted == r[0] or dotted.startswith(r[0] + ".")]
    _, verdict, why = max(matches, key=lambda r: len(r[0]))
    return verdict, why


def changes(old: Params, new: Params) -> List[Change]:
    """The keys whose values differ between two params, in schema order, with their rules."""
    found = []
    for dotted, _ in all_keys():
        before, after = _value(old, dotted), _value(new, dotted)
        if before != after:
            found.append(Change(dotted, before, after, *rule(dotted)))
    return found


def check_resume(run_params: Optional[Params], params: Params, params_path: str,
                 keys: Tuple[str, ...] = ()) -> List[Change]:
    """Compare `params` with the run record `run_params` (ModelDir.load_run_params; None: a first run, no
    changes). Raises `ModelDirError` for refused changes (only those under `keys`, when given); returns the
    others (applied, or of no effect), to be printed."""
    if run_params is None:
        return []
    found = changes(run_params, params)
    refused = [c for c in found if c.verdict == REFUSED and (not keys or _under(c.key, keys))]
    if refused:
        detail = "; ".join(f"{c.key} was {c.old!r}, now {c.new!r} ({c.why})" for c in refused)
        raise ModelDirError(f"{params_path}: cannot resume with these changes: {detail}. Restore the old value, "
                            f"or start a new experiment.model_dir; nothing was changed on disk")
    return [c for c in found if c.verdict != REFUSED]


def resume_table() -> str:
    """The resume table of docs/resume.md (Markdown) from `RULES`."""
    rows = ["| key | on resume | what happens, or why not |", "|---|---|---|"]
    rows += [f"| `{key}` | {verdict} | {why} |" for key, verdict, why in RULES]
    return "\n".join(rows)


def _value(params: Dict, dotted: str):
    node = schema.lookup(params, dotted)
    return node.to_dict() if isinstance(node, Params) else node


def _under(dotted: str, prefixes: Tuple[str, ...]) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)
