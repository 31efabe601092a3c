"""Metrics on disk: JSON lines + TensorBoard, a history that survives resume, summary.json.

``WORKDIR/metrics.jsonl`` holds one JSON object per line, each with ``step`` and either the
training means of a log interval (``train_loss``, ``train_accuracy``, ...) or an evaluation
(``test_accuracy``, ...). On resume from step ``s`` the lines after ``s`` (written after the
last checkpoint) are dropped, so the history always matches the restored state, and the best
accuracy is recomputed from it. Each checkpoint's record (``checkpointing.py``) holds a copy
of the history up to its step: :func:`resume_history` restores a missing, truncated or
edited ``metrics.jsonl`` from it (with a one-line warning), so the summary never loses a value.
"""

import json
import math
import os
from collections.abc import Iterable

import tensorboardX
from absl import logging

from experiments.runtime import errors, files

METRICS_FILE = 'metrics.jsonl'
SUMMARY_FILE = 'summary.json'


def read_history(workdir: str, *, up_to_step: int | None = None) -> list[dict]:
    """The records of ``metrics.jsonl`` (none if absent), only those with step <= up_to_step."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if up_to_step is None or record['step'] <= up_to_step:
                records.append(record)
    return records


class HistoryError(errors.BadInputError):
    """``metrics.jsonl`` lacks records the checkpoint needs, and nothing holds a copy."""


def resume_history(workdir: str, step: int, *,
                   recorded: list[dict] | None = None) -> tuple[list[dict], bool]:
    """``(history up to step, whether metrics.jsonl lacked it)`` for a run resumed at ``step``.

    Args:
      workdir: the run's folder.
      step: the restored step (0: a new run).
      recorded: the copy of the history in the restored checkpoint's record, or None (a step
        saved before records); it wins over the file.

    Raises:
      HistoryError: the file lacks the record of ``step`` and ``recorded`` is None.
    """
    path = os.path.join(workdir, METRICS_FILE)
    found = read_history(workdir, up_to_step=step)
    if recorded is not None:
        if found != recorded:
            logging.warning(
                '%s lacks or differs in records up to step %d (missing, truncated or edited); '
                'restored them from the record of the checkpoint at that step.', path, step)
        return recorded, found != recorded
    if step and not any(r.get('step') == step for r in found):
        raise HistoryError(
            f'{path} lacks the records up to step {step} (missing or truncated) and the '
            'checkpoint predates records; restore the file, or pass another --workdir.')
    return found, False


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricWriter:
    """Appends records to ``metrics.jsonl`` and TensorBoard; keeps them in ``history``.

    Opening it on a workdir truncates the history to ``start_step`` (the restored step) and
    tells TensorBoard to purge later events, so a resumed run never shows stale points.
    """

    def __init__(self, workdir: str, *, start_step: int = 0, write_files: bool = True,
                 history: list[dict] | None = None):
        # write_files=False (processes other than 0 of a multi-process run): keep the
        # history in memory only, so exactly one process writes the workdir's metrics.
        # history: the records up to start_step (default: those of the file).
        self.path = os.path.join(workdir, METRICS_FILE)
        if history is None:
            history = read_history(workdir, up_to_step=start_step)
        self.history = list(history)
        self._tb = None
        if write_files:
            write_history(workdir, self.history)
            self._tb = tensorboardX.SummaryWriter(
                os.path.join(workdir, 'tensorboard'), purge_step=start_step or None)

    def write(self, step: int, scalars: dict) -> dict:
        record = {'step': int(step), **{k: _json_number(v) for k, v in scalars.items()}}
        self.history.append(record)
        if self._tb is None:
            return record
        with open(self.path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and key not in ('epoch',):
                self._tb.add_scalar(key, value, step)
        return record

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def write_history(workdir: str, history: list[dict]) -> None:
    """Rewrites ``metrics.jsonl`` as ``history``: beside and renamed over, so a crash here
    never loses it."""
    files.write_atomic(os.path.join(workdir, METRICS_FILE),
                       ''.join(json.dumps(r) + '\n' for r in history))


def last(history: Iterable[dict], key: str, default=None):
    """The latest value of ``key`` in the history."""
    values = [r[key] for r in history if r.get(key) is not None]
    return values[-1] if values else default


def best(history: Iterable[dict], key: str, default=None):
    """The largest value of ``key`` in the history."""
    values = [r[key] for r in history if r.get(key) is not None]
    return max(values) if values else default


def write_summary(workdir: str, summary: dict) -> str:
    """Writes ``summary.json``, unless it already holds exactly ``summary`` (a rerun of a
    finished run leaves it untouched)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    try:
        same = files.read_json(path) == json.loads(json.dumps(summary))
    except (OSError, ValueError):
        same = False
    return path if same else files.write_json(path, summary)


def format_summary(summary: dict) -> str:
    """A one-screen table of the summary (percentages for accuracies)."""
    lines = ['', f'== {summary.get("dataset")} / {summary.get("model")} / '
             f'{summary.get("optimizer")} ==']
    for key in sorted(summary):
        value = summary[key]
        if isinstance(value, float) and 'accuracy' in key:
            value = f'{100 * value:.2f}%'
        elif isinstance(value, float):
            value = f'{value:.4g}'
        lines.append(f'  {key:<32} {value}')
    return '\n'.join(lines)
