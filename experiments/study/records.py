"""A grid's finished cells kept outside its workdir, so a study survives a fresh machine.

A long grid (hours on a CPU) outlives the machine it started on, and ``runs/`` does not travel.
With ``--results_dir DIR`` (a folder in the repository, e.g.
``experiments/study/results/label_noise_fmnist``), each finished cell's small files
(``summary.json``, ``metrics.jsonl``, ``diagnostics.json``: tens of KB) are copied to
``DIR/<cell>/`` as soon as the cell is done, and with ``--git_commit`` committed at once (only
those files; the shards of a grid may commit from one checkout: a commit waits for another's
index lock). A later run on a fresh clone restores the records into the workdir before it
starts: finished cells are skipped and aggregation sees them, without their checkpoints.
"""

import os
import shutil
import subprocess
import time

from experiments.runtime import errors, files, metrics

# What a finished cell needs for the tables, curves and diagnostics; no checkpoints.
RECORD_FILES = (metrics.SUMMARY_FILE, metrics.METRICS_FILE, 'diagnostics.json')
# How long --git_commit waits for another process's git (e.g. another shard's commit).
LOCK_WAIT_S = 60.0


def _copy(src_dir: str, dst_dir: str) -> list[str]:
    copied = []
    for name in RECORD_FILES:
        src = os.path.join(src_dir, name)
        if os.path.exists(src):
            os.makedirs(dst_dir, exist_ok=True)
            with files.atomic_path(os.path.join(dst_dir, name)) as tmp:  # processes may race
                shutil.copyfile(src, tmp)
            copied.append(os.path.join(dst_dir, name))
    return copied


def is_recorded(results_dir: str, cell_name: str) -> bool:
    """Whether ``results_dir`` holds a completed record of the cell."""
    summary = files.read_json(os.path.join(results_dir, cell_name, metrics.SUMMARY_FILE))
    return bool(summary and summary.get('completed'))


def restore(results_dir: str, workdir: str, cell_names) -> list[str]:
    """Copies the records of finished cells into ``workdir`` where it has no finished run.

    Returns the names restored. A workdir run that is already finished is left alone.
    """
    restored = []
    for name in cell_names:
        summary = files.read_json(os.path.join(workdir, name, metrics.SUMMARY_FILE))
        if is_recorded(results_dir, name) and not (summary and summary.get('completed')):
            _copy(os.path.join(results_dir, name), os.path.join(workdir, name))
            restored.append(name)
    return restored


def record(cell_dir: str, results_dir: str, cell_name: str, *, git_commit: bool) -> list[str]:
    """Copies a finished cell's record into ``results_dir``; commits just those files if asked.

    Raises:
      errors.ConfigError: ``git_commit`` and the commit failed (e.g. not a git checkout); the
        record itself is written first, so nothing is lost.
    """
    paths = _copy(cell_dir, os.path.join(results_dir, cell_name))
    if git_commit and paths:
        message = f'results: {os.path.basename(os.path.normpath(results_dir))} {cell_name}'
        for command in (['git', 'add', '--', *paths],
                        ['git', 'commit', '--quiet', '-m', message, '--', *paths]):
            proc = _git(command)
            if proc.returncode:
                lines = (proc.stderr or proc.stdout).strip().splitlines() or ['']
                cause = next((ln for ln in lines if ln.startswith(('fatal:', 'error:'))),
                             lines[-1])
                raise errors.ConfigError(
                    f'--git_commit: `{" ".join(command[:2])}` failed ({cause}); the record '
                    f'is in {results_dir}, commit it by hand or drop --git_commit.'
                )
    return paths


def _git(command: list[str]) -> subprocess.CompletedProcess:
    """Runs ``command``, retrying while another git process holds the index lock (the shards
    of a grid committing from one checkout) for up to :data:`LOCK_WAIT_S` seconds."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        proc = subprocess.run(command, capture_output=True, text=True)
        if (not proc.returncode or 'index.lock' not in proc.stderr
                or time.monotonic() > deadline):
            return proc
        time.sleep(0.2)
