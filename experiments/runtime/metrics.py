"""Metrics on disk: JSON lines + TensorBoard, a history that survives resume, summary.json.

``WORKDIR/metrics.jsonl`` holds one JSON object per line, each with ``step`` and either the
training means of a log interval (``train_loss``, ``train_accuracy``, ...) or an evaluation
(``test_accuracy``, ...). On resume from step ``s`` the lines after ``s`` (written after the
last checkpoint) are dropped, so the history always matches the restored state, and the best
accuracy is recomputed from it.
"""

import json
import math
import os
from collections.abc import Iterable

import tensorboardX

from experiments.runtime import files

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


def _json_number(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricWriter:
    """Appends records to ``metrics.jsonl`` and TensorBoard; keeps them in ``history``.

    Opening it on a workdir truncates the history to ``start_step`` (the restored step) and
    tells TensorBoard to purge later events, so a resumed run never shows stale points.
    """

    def __init__(self, workdir: str, *, start_step: int = 0, write_files: bool = True):
        # write_files=False (processes other than 0 of a multi-process run): keep the
        # history in memory only, so exactly one process writes the workdir's metrics.
        self.path = os.path.join(workdir, METRICS_FILE)
        self.history = read_history(workdir, up_to_step=start_step)
        self._tb = None
        if write_files:
            # Rewritten beside and renamed over: a crash here never loses the history.
            files.write_atomic(self.path, ''.join(json.dumps(r) + '\n' for r in self.history))
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


def last(history: Iterable[dict], key: str, default=None):
    """The latest value of ``key`` in the history."""
    values = [r[key] for r in history if r.get(key) is not None]
    return values[-1] if values else default


def best(history: Iterable[dict], key: str, default=None):
    """The largest value of ``key`` in the history."""
    values = [r[key] for r in history if r.get(key) is not None]
    return max(values) if values else default


def write_summary(workdir: str, summary: dict) -> str:
    return files.write_json(os.path.join(workdir, SUMMARY_FILE), summary)


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
