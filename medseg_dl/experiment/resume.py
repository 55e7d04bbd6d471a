"""What a resume may change: one rule per params key, checked before anything is written.

The params the checkpoints follow are kept in `checkpoints/run_params.yaml` (ModelDir.run_params),
written by the trainer when it starts. Resuming (`medseg train --params <model_dir>/params.yaml`,
edited by hand or with `--set`) compares the new params with them key by key: a key whose rule is
"applied" takes effect from the resume step and is printed; a key whose rule is "no effect" is printed
with the reason; a key whose rule is "refused" stops the command with one line naming the key, the
reason and the fix, before any file is changed. The
evaluator and `medseg predict` apply the same check to the network-defining keys, so a hand-edited
params.yaml can never build a network the checkpoints do not fit. The rules are the schema's (each key's
or section's `on_resume`, config/schema.py); the resume table of docs/resume.md is generated from them
(`medseg params-doc --resume`).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from medseg_dl.config import schema
from medseg_dl.config.params import Params, all_keys
from medseg_dl.errors import ModelDirError

# the keys that decide whether a checkpoint fits a network: checked by the evaluator and predict
NETWORK_KEYS = tuple(dotted for dotted, rule in schema.resume_rules() if rule.network)


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


def changes(old: Params, new: Params) -> List[Change]:
    """The keys whose values differ between two params, in schema order, with their rules."""
    found = []
    for dotted, _ in all_keys():
        before, after = _value(old, dotted), _value(new, dotted)
        if before != after:
            rule = schema.resume_rule(dotted)
            found.append(Change(dotted, before, after, rule.verdict, rule.why))
    return found


def check_resume(run_params: Optional[Params], params: Params, params_path: str,
                 keys: Tuple[str, ...] = ()) -> List[Change]:
    """Compare `params` with the run record `run_params` (ModelDir.load_run_params; None: a first run, no
    changes). Raises `ModelDirError` for refused changes (only those under `keys`, when given); returns the
    others (applied, or of no effect), to be printed."""
    if run_params is None:
        return []
    found = changes(run_params, params)
    refused = [c for c in found if c.verdict == schema.REFUSED and (not keys or _under(c.key, keys))]
    if refused:
        detail = "; ".join(f"{c.key} was {c.old!r}, now {c.new!r} ({c.why})" for c in refused)
        raise ModelDirError(f"{params_path}: cannot resume with these changes: {detail}. Restore the old value, "
                            f"or start a new experiment.model_dir; nothing was changed on disk")
    return [c for c in found if c.verdict != schema.REFUSED]


def resume_table() -> str:
    """The resume table (Markdown) of the schema's rules (`schema.resume_rules`): a section's row holds for its
    keys without a row of their own."""
    rows = ["| key | on resume | what happens, or why not |", "|---|---|---|"]
    rows += [f"| `{dotted}` | {rule.verdict} | {rule.why} |" for dotted, rule in schema.resume_rules()]
    return "\n".join(rows)


def _value(params: Dict, dotted: str):
    node = schema.lookup(params, dotted)
    return node.to_dict() if isinstance(node, Params) else node


def _under(dotted: str, prefixes: Tuple[str, ...]) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)
