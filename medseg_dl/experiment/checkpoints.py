"""Checkpoint files as the trainer and the evaluation process see them: listing, staging, best-K keeping.

Training's CheckpointManager may delete a checkpoint at any moment. The evaluator therefore
first copies a checkpoint's files into a private staging folder (a deletion before or during the
copy is reported as `CheckpointGone`), restores from the copy, and promotes that copy into
`<model_dir>/best/` when it ranks among the best K (copied under a temporary name, then renamed).
"""
import glob
import itertools
import json
import os
import re
import shutil
from typing import List, Optional, Set

import tensorflow as tf

from medseg_dl.runtime import atomic

_STEP = re.compile(r"ckpt-(\d+)$")


class CheckpointGone(Exception):
    """The checkpoint was deleted (by training's rotation) before it could be copied."""


def checkpoint_step(prefix: str) -> int:
    """The step number of a checkpoint prefix '.../ckpt-<step>'."""
    match = _STEP.search(os.path.basename(prefix))
    if not match:
        raise ValueError(f"{prefix}: not a checkpoint prefix of the form ckpt-<step>")
    return int(match.group(1))


def completed_checkpoints(folder: str) -> List[str]:
    """The checkpoint prefixes training has finished writing, sorted by step: those listed in the
    CheckpointManager's state file (`<folder>/checkpoint`, replaced atomically after the checkpoint's
    files are complete); a .index file alone proves nothing, TensorFlow writes it in place."""
    state = tf.train.get_checkpoint_state(folder)
    if state is None:
        return []
    prefixes = state.all_model_checkpoint_paths  # TensorFlow has joined relative ones with `folder`
    return sorted((p for p in prefixes if _STEP.search(os.path.basename(p))), key=checkpoint_step)


def set_aside_checkpoints(prefixes: List[str], folder: str) -> None:
    """Move the files of checkpoints (e.g. unreadable ones) into `folder` (created) and drop them from the
    checkpoint state of their own folder, so that a CheckpointManager built afterwards neither lists them
    nor takes one of them for the latest (it would then skip saving that step again)."""
    os.makedirs(folder, exist_ok=True)
    for prefix in prefixes:
        for path in _files_of(prefix):
            os.replace(path, os.path.join(folder, os.path.basename(path)))
    if prefixes:
        _drop_from_state(os.path.dirname(prefixes[0]), {os.path.basename(p) for p in prefixes})


def _drop_from_state(folder: str, names: Set[str]) -> None:
    """Rewrite `<folder>/checkpoint` (TensorFlow's CheckpointState text with relative paths, as the
    CheckpointManager writes it) without the checkpoints `names`; the latest becomes the newest left."""
    state = tf.train.get_checkpoint_state(folder)
    kept = [(os.path.basename(p), t) for p, t in
            itertools.zip_longest(state.all_model_checkpoint_paths, state.all_model_checkpoint_timestamps)
            if os.path.basename(p) not in names]
    lines = [f'model_checkpoint_path: "{kept[-1][0]}"'] if kept else []
    lines += [f'all_model_checkpoint_paths: "{p}"' for p, _ in kept]
    lines += [f"all_model_checkpoint_timestamps: {t!r}" for _, t in kept if t is not None]
    lines.append(f"last_preserved_timestamp: {state.last_preserved_timestamp!r}")
    atomic.write_text(os.path.join(folder, "checkpoint"), "\n".join(lines) + "\n")


def remove_unlisted_checkpoints(folder: str) -> List[str]:
    """Delete the checkpoint files in `folder` that its checkpoint state does not list (a save cut by a kill
    or a full disk; a rotation's deletion cut short), and TensorFlow's `<prefix>_temp` folders of unfinished
    saves. Only the trainer of the folder may call it. Returns the removed prefixes."""
    listed = {os.path.basename(p) for p in completed_checkpoints(folder)}
    names = {n.split(".", 1)[0] for n in os.listdir(folder) if n.endswith(".index") or ".data-" in n}
    removed = [os.path.join(folder, n) for n in sorted(names) if _STEP.search(n) and n not in listed]
    for prefix in removed:
        remove_checkpoint(prefix)
    for name in os.listdir(folder):
        if name.endswith("_temp") and os.path.isdir(os.path.join(folder, name)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    return removed


def _files_of(prefix):
    return sorted(glob.glob(prefix + ".index") + glob.glob(prefix + ".data-*"))


def stage_checkpoint(prefix: str, staging_dir: str) -> str:
    """Copy a checkpoint's files into `staging_dir`; returns the staged prefix.
    Raises `CheckpointGone` if any file vanishes under us."""
    os.makedirs(staging_dir, exist_ok=True)
    files = _files_of(prefix)
    if not any(f.endswith(".index") for f in files) or not any(".data-" in f for f in files):
        raise CheckpointGone(prefix)
    try:
        for path in files:
            shutil.copyfile(path, os.path.join(staging_dir, os.path.basename(path)))
    except FileNotFoundError:
        raise CheckpointGone(prefix) from None
    return os.path.join(staging_dir, os.path.basename(prefix))


def remove_checkpoint(prefix: str) -> None:
    """Delete the .index and .data-* files of a checkpoint prefix."""
    for path in _files_of(prefix):
        os.remove(path)


class BestCheckpoints:
    """The best `keep` checkpoints by a metric (higher is better) in `folder`, listed in the JSON file
    `index_path` (the model folder's best/best.json) as [{"step", "metric", "value", "checkpoint"}]
    from best to worst."""

    def __init__(self, folder: str, index_path: str, keep: int, metric: str):
        self.folder, self.path, self.keep, self.metric = folder, index_path, keep, metric
        self.entries = json.load(open(self.path)) if os.path.isfile(self.path) else []

    def offer(self, staged_prefix: str, step: int, value: float) -> bool:
        """Keep the staged checkpoint if it ranks among the best; returns True if kept."""
        if value != value:  # NaN never ranks
            return False
        ranked = sorted(self.entries + [{"step": step, "value": value}], key=lambda e: -e["value"])
        if {"step": step, "value": value} not in ranked[: self.keep]:
            return False
        name = os.path.basename(staged_prefix)
        for path in _files_of(staged_prefix):
            atomic.copy_file(path, os.path.join(self.folder, os.path.basename(path)))
        self.entries = [e for e in self.entries if e["step"] != step] + [
            {"step": step, "metric": self.metric, "value": value, "checkpoint": name}]
        self.entries.sort(key=lambda e: -e["value"])
        for dropped in self.entries[self.keep:]:
            remove_checkpoint(os.path.join(self.folder, dropped["checkpoint"]))
        self.entries = self.entries[: self.keep]
        self._write()
        return True

    def best_prefix(self) -> Optional[str]:
        """The prefix of the best kept checkpoint, or None."""
        return os.path.join(self.folder, self.entries[0]["checkpoint"]) if self.entries else None

    def _write(self):
        atomic.write_json(self.path, self.entries)
