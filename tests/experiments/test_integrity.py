"""Integrity of a run's results: verified checkpoints, a finished run left as it is, the
checkpoint record as the authority on the config and the metrics history.

The end-to-end tests call ``train_and_evaluate`` in-process on an 8-step version of the tiny
digits run of ``test_reliability.py``; they share one finished run, copied per test.
"""

import glob
import json
import logging
import os
import shutil
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.image_classification import task
from experiments.runtime import checkpointing, metrics
from experiments.runtime import workdir as workdir_lib
from tests.experiments.test_reliability import save_steps, snapshot, steps_in, tiny_config

NUM_STEPS = 8


def small_config():
    config = tiny_config()
    config.num_train_steps = NUM_STEPS  # checkpoints at 4 and 8, both kept
    return config


class Finished:
    def __init__(self, root):
        self.path = os.path.join(root, 'finished')
        self.summary = task.train_and_evaluate(small_config(), self.path)
        with open(os.path.join(self.path, metrics.METRICS_FILE), 'rb') as f:
            self.metrics = f.read()
        with open(os.path.join(self.path, metrics.SUMMARY_FILE), 'rb') as f:
            self.summary_bytes = f.read()

    def copy(self, target):
        shutil.copytree(self.path, target)
        return str(target)


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """One uninterrupted 8-step run, made once for the module."""
    return Finished(tmp_path_factory.mktemp('integrity'))


def warnings_with(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def read(path):
    with open(path, 'rb') as f:
        return f.read()


def flip_bytes(step_dir, count=64):
    """Inverts ``count`` bytes in the middle of the largest array data file of a step."""
    data = [p for p in glob.glob(os.path.join(step_dir, '**', 'd', '*'), recursive=True)
            if os.path.isfile(p)]
    path = max(data, key=os.path.getsize)
    with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(count)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_flipped_byte_in_the_latest_checkpoint_is_caught_and_trained_again(
        finished, tmp_path, caplog):
    workdir = finished.copy(tmp_path / 'run')
    flip_bytes(os.path.join(workdir, 'checkpoints', str(NUM_STEPS)))
    # And metrics.jsonl cut short: the history up to step 4 comes from that step's record.
    path = os.path.join(workdir, metrics.METRICS_FILE)
    os.truncate(path, finished.metrics.index(b'\n') + 10)  # a record and part of the next
    os.remove(os.path.join(workdir, metrics.SUMMARY_FILE))
    with caplog.at_level(logging.WARNING):
        summary = task.train_and_evaluate(small_config(), workdir)
    [warning] = warnings_with(caplog, 'Skipped the checkpoint')
    assert warning.startswith(f'Skipped the checkpoint at step {NUM_STEPS}: it is unreadable '
                              '(CorruptCheckpointError: ')
    assert 'differ from the digests recorded when it was saved' in warning
    assert warning.endswith('and resumed from step 4.')
    assert summary['params_checksum'] == finished.summary['params_checksum']  # bitwise
    assert steps_in(workdir) == [4, NUM_STEPS]
    aside = os.path.join(workdir, checkpointing.UNREADABLE_DIR, str(NUM_STEPS))
    assert os.path.exists(os.path.join(aside, 'record.json'))  # kept with its step

    [warning] = warnings_with(caplog, path)
    assert warning.startswith(f'{path} lacks or differs in records up to step 4 ')
    timing = ('wall_time_s', 'images_per_sec')  # the only values a resume changes
    assert ({k: v for k, v in summary.items() if k not in timing}
            == {k: v for k, v in finished.summary.items() if k not in timing})
    history, expected = metrics.read_history(workdir), metrics.read_history(finished.path)
    assert [r['step'] for r in history] == [r['step'] for r in expected]
    assert history[:2] == expected[:2]  # the records up to step 4, restored


def test_rerunning_a_finished_run_rewrites_nothing(finished, tmp_path):
    workdir = finished.copy(tmp_path / 'run')
    before = snapshot(workdir)
    summary_file = os.path.join(workdir, metrics.SUMMARY_FILE)
    stat = os.stat(summary_file)
    summary = task.train_and_evaluate(small_config(), workdir)
    assert summary == finished.summary
    assert snapshot(workdir) == before  # no new TensorBoard events, no rewritten artifacts
    after = os.stat(summary_file)
    assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


@pytest.mark.parametrize('how', ['deleted', 'truncated'])
def test_a_lost_metrics_file_of_a_finished_run_is_restored_and_no_value_lost(
        finished, tmp_path, caplog, how):
    workdir = finished.copy(tmp_path / 'run')
    path = os.path.join(workdir, metrics.METRICS_FILE)
    if how == 'deleted':
        os.remove(path)
    else:
        os.truncate(path, len(finished.metrics) // 2)
    with caplog.at_level(logging.WARNING):
        summary = task.train_and_evaluate(small_config(), workdir)
    assert len(warnings_with(caplog, path)) == 1
    assert summary == finished.summary
    assert read(os.path.join(workdir, metrics.SUMMARY_FILE)) == finished.summary_bytes
    assert read(path) == finished.metrics


@pytest.mark.parametrize('how', ['deleted', 'edited'])
def test_a_changed_config_is_refused_whatever_config_json_says(finished, tmp_path, how):
    workdir = finished.copy(tmp_path / 'run')
    path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
    original = json.loads(read(path))
    config = small_config()
    config.rho = 0.05
    if how == 'deleted':
        os.remove(path)
    else:  # made to agree with the new flags by hand
        workdir_lib.save_config(workdir, config)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        task.train_and_evaluate(config, workdir)
    assert str(error.value) == (
        f'Workdir {workdir} was started with another config (rho: 0.5 -> 0.05); rerun with '
        '--allow_config_change to continue it with this one, or pass another --workdir.')
    if how == 'deleted':  # restored from the checkpoint's record, not from the new flags
        assert json.loads(read(path)) == original


# --------------------------------------------------------------------------- units


class ToyState(NamedTuple):
    step: jnp.ndarray
    w: jnp.ndarray
    b: dict


def toy_state(step):
    return ToyState(jnp.int32(step), jnp.arange(100.0) + step, {'x': jnp.ones(3)})


def save_recorded(workdir, steps, keep=3, **extra):
    manager = checkpointing.make_manager(str(workdir), keep=keep)
    for step in steps:
        checkpointing.save(manager, toy_state(step), **extra)
    manager.wait_until_finished()
    manager.close()


def restore(workdir):
    manager = checkpointing.make_manager(str(workdir), keep=3)
    try:
        return checkpointing.restore_latest_with_record(manager, toy_state(0))
    finally:
        manager.close()


def test_records_describe_kept_steps_and_extras(tmp_path):
    save_recorded(tmp_path, [1, 2, 3, 4], keep=2, history=[{'step': 4}])
    records = sorted(os.listdir(tmp_path / checkpointing.RECORDS_DIR))
    # Step 2's record goes with the next save (orbax drops step 2 once step 4 is final).
    assert steps_in(tmp_path) == [3, 4] and records == ['2.json', '3.json', '4.json']
    state, record = restore(tmp_path)
    assert int(state.step) == 4 and record['history'] == [{'step': 4}]
    assert record['digests'] == checkpointing.digests(toy_state(4))
    assert checkpointing.latest_record(str(tmp_path))['step'] == 4


def test_a_record_whose_step_never_completed_is_harmless(tmp_path, caplog):
    save_recorded(tmp_path, [1, 2])
    # What kill -9 between writing step 3's record and orbax finalising step 3 leaves.
    shutil.copy(tmp_path / checkpointing.RECORDS_DIR / '2.json',
                tmp_path / checkpointing.RECORDS_DIR / '3.json')
    with caplog.at_level(logging.WARNING):
        state, _ = restore(tmp_path)
    assert int(state.step) == 2 and not caplog.records
    save_recorded(tmp_path, [3])  # the resumed run saves step 3 again: its record anew
    assert int(restore(tmp_path)[0].step) == 3


@pytest.mark.parametrize('how', ['digest', 'garbled'])
def test_a_step_that_disagrees_with_its_record_is_set_aside(tmp_path, caplog, how):
    save_recorded(tmp_path, [1, 2])
    path = tmp_path / checkpointing.RECORDS_DIR / '2.json'
    if how == 'digest':  # as if the arrays had changed since the save
        record = json.loads(path.read_text())
        record['digests']['.w'] = checkpointing.digests(toy_state(0))['.w']
        path.write_text(json.dumps(record))
    else:
        path.write_text('{"step": 2, "dig')
    with caplog.at_level(logging.WARNING):
        state, _ = restore(tmp_path)
    assert int(state.step) == 1
    [warning] = warnings_with(caplog, 'Skipped the checkpoint at step 2')
    reason = '1 of its 3 arrays differ' if how == 'digest' else f'its record {path} is unreadable'
    assert reason in warning
    assert steps_in(tmp_path) == [1]


def test_a_step_saved_before_records_is_restored_with_one_warning(tmp_path, caplog):
    save_steps(tmp_path, [1, 2])  # orbax alone: no records
    with caplog.at_level(logging.WARNING):
        state, record = restore(tmp_path)
    assert int(state.step) == 2 and record is None
    np.testing.assert_array_equal(state.w, toy_state(2).w)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith('The checkpoint at step 2 has no record in ')
    assert checkpointing.latest_record(str(tmp_path)) is None
