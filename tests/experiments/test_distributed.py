"""Data parallelism: simulated devices, a 2-process run over loopback, m-sharpness, bad input."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from experiments.configs import digits_resnet
from experiments.image_classification import task
from experiments.runtime import errors, metrics
from experiments.runtime import workdir as workdir_lib
from tests.experiments import tiny_model
from tests.experiments.conftest import REPO, cli_command, cli_env, run_cli

TINY = ['--config.model_kwargs.width=4', '--config.progress_bar=False']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def devices_env(n: int) -> dict:
    return {'JAX_NUM_CPU_DEVICES': str(n), 'JAX_PLATFORMS': 'cpu'}


@pytest.mark.slow
def test_trainer_on_8_simulated_devices():
    proc = subprocess.run([sys.executable, '-m', 'tests.experiments.distributed_checks'],
                          cwd=REPO, env=cli_env(devices_env(8)), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert 'distributed trainer checks passed' in proc.stdout


def start_two_processes(args, workdir):
    """Starts process 0 and 1; their output goes to files, never to pipes: a process blocked
    on a full pipe nobody reads stalls the other at the next collective."""
    address = f'127.0.0.1:{free_port()}'
    procs = []
    for i in range(2):
        logs = [open(workdir.parent / f'{workdir.name}.{i}.{s}', 'w+') for s in ('out', 'err')]
        procs.append(subprocess.Popen(
            cli_command([*args, '--workdir', str(workdir), f'--coordinator_address={address}',
                         '--num_processes=2', f'--process_id={i}',
                         '--distributed_timeout_s=120'], mock_examples=64),
            cwd=REPO, env=cli_env(devices_env(2)), stdout=logs[0], stderr=logs[1], text=True))
        procs[-1].logs = logs
    return procs


def finish(procs, timeout=300):
    """Waits for ``procs``; returns the (stdout, stderr) each wrote since it started."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
        outs = []
        for p in procs:
            for f in p.logs:
                f.seek(0)
            outs.append(tuple(f.read() for f in p.logs))
        return outs
    finally:
        for p in procs:  # never leave a process behind, whatever failed
            p.kill()
            for f in p.logs:
                f.close()


def wait_for_logged_step(workdir, step, procs, timeout=300):
    """Waits until ``workdir``'s metrics log holds a train record at ``step`` or later."""
    path, deadline = workdir / 'metrics.jsonl', time.monotonic() + timeout
    while True:
        logged = [r['step'] for r in metrics.read_history(str(workdir)) if 'train_loss' in r] \
            if path.exists() else []
        if logged and logged[-1] >= step:
            return
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            f'no train record at step {step}: {[p.poll() for p in procs]}'
        time.sleep(0.05)


# CIFAR-10 (mock TFDS) on the tests' tiny BatchNorm MLP: the run machinery is the point, and
# it compiles in a second where even WRN-10-1 takes several.
CIFAR10_TINY = f"""
from experiments.configs import cifar10_resnet18


def get_config():
    config = cifar10_resnet18.get_config()
    config.model = {tiny_model.PATH!r}
    config.model_kwargs = {{}}
    return config
"""


@pytest.mark.slow
def test_two_processes_preempt_fall_back_resume_and_match_one_process(tmp_path):
    """2 processes x 2 devices over loopback, the real CLI on mock TFDS data, in one story:

    0. while another live run holds the workdir, both processes refuse at once with its one
       line and exit 2 (process 0 holds the lock for all; none waits at a collective);
    1. SIGTERM to one process stops both at the same step, both checkpointed (preemption);
    2. the rerun finds that step damaged: both processes skip it with a warning, resume from
       the step before, and process 0 alone moves it aside (checkpoint fallback);
    3. the finished run matches 1 process x 4 devices: the same maths summed in another
       order across processes, each process reading only its 2 of the 4 data shards, and
       only process 0 writing the metrics.
    """
    from tests.experiments.test_reliability import damage

    steps = 12
    config = tmp_path / 'cifar10_tiny.py'
    config.write_text(CIFAR10_TINY)
    common = ['--config', str(config),
              f'--config.num_train_steps={steps}', '--config.batch_size=16',
              '--config.eval_batch_size=16', '--config.log_every_steps=2',
              '--config.eval_every_steps=1000', '--config.progress_bar=False', '--verbosity=0']
    args = [*common, '--config.checkpoint_every_steps=2', '--config.keep_checkpoints=3']
    workdir = tmp_path / 'two'
    workdir.mkdir()
    with workdir_lib.lock(str(workdir)):
        procs = start_two_processes(args, workdir)
        outs = finish(procs, timeout=120)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-3000:]
        assert err.strip().splitlines()[-1] == (
            f'error: Workdir {workdir} is in use by another run (pid {os.getpid()}); wait '
            'for it to end or pass another --workdir.'), err[-3000:]
    assert os.listdir(workdir) == ['.lock']  # nothing written by the refused run

    procs = start_two_processes(args, workdir)
    try:
        wait_for_logged_step(workdir, 4, procs)  # checkpoints 2 and 4 exist or are being saved
        procs[1].send_signal(signal.SIGSTOP)  # paused mid-run; process 0 waits for it
        procs[1].send_signal(signal.SIGTERM)  # delivered when it continues
        procs[1].send_signal(signal.SIGCONT)
    finally:
        outs = finish(procs)
    stopped = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        stopped.append(out.strip().splitlines()[-1])
    step = json.loads((workdir / 'summary.json').read_text())['steps']
    assert 4 <= step < steps and step % 2 == 0
    # Both stop at the same step; process 0 names the process that was signalled.
    assert stopped == [
        f'Preempted at step {step} (another process); rerun the same command to resume.',
        f'Preempted at step {step} (SIGTERM); rerun the same command to resume.']

    damage(workdir / 'checkpoints' / str(step), 'garbage')
    procs = start_two_processes(args, workdir)
    outs = finish(procs)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert (f'Skipped the checkpoint at step {step}' in err
                and f'resumed from step {step - 2}' in err), err[-3000:]
    assert os.listdir(workdir / 'checkpoints_unreadable') == [str(step)]
    two = json.loads((workdir / 'summary.json').read_text())
    assert two['completed'] and two['steps'] == steps
    logged = [r['step'] for r in metrics.read_history(str(workdir)) if 'train_loss' in r]
    assert logged == list(range(2, steps + 1, 2))  # no gap, no step logged twice

    one = run_cli([*common, '--workdir', str(tmp_path / 'one')], mock_examples=64,
                  env=devices_env(4))  # checkpoints change nothing in the maths
    assert one.returncode == 0, one.stderr[-3000:]
    ref = json.loads((tmp_path / 'one' / 'summary.json').read_text())
    # The same maths summed in another order: the first logged loss agrees to float32
    # rounding over 2 steps, the last to that rounding amplified over 12 steps (bounds, not
    # one CPU's digits), and the accuracy on the 64 mock test examples up to a few
    # predictions flipped by it.
    first = lambda d: next(r['train_loss'] for r in metrics.read_history(str(d))
                           if 'train_loss' in r)
    assert first(workdir) == pytest.approx(first(tmp_path / 'one'), rel=1e-4)
    assert two['final_train_loss'] == pytest.approx(ref['final_train_loss'], rel=2e-2)
    assert abs(two['final_test_accuracy'] - ref['final_test_accuracy']) <= 3 / 64 + 1e-9
    assert 'Process 0 read 128 images (its 4 of the 4 data shards)' in one.stderr
    for i, (_, err) in enumerate(outs):
        assert f'Process {i} read 64 images (its 2 of the 4 data shards)' in err, err[-3000:]
    one_logged = [r['step'] for r in metrics.read_history(str(tmp_path / 'one'))]
    assert len([r['step'] for r in metrics.read_history(str(workdir))]) == len(one_logged)


@pytest.mark.slow
def test_fixed_data_shards_make_m_sharpness_runs_device_count_independent(tmp_path):
    """--config.data_shards=4 with m-sharpness: 1 and 4 devices take the same steps.

    What is invariant is the data order and the maths, not the float rounding: the first
    step's loss (the same params on the same examples; only the summation order differs, so
    float32 rounding bounds the difference by ~n * 2**-24 relative for n <= 160 terms) is
    compared at 1e-5. Later steps start from params that already differ in the last bits, and
    SAM's ascent through ReLU kinks of this small network amplifies that by an amount that
    depends on the CPU's XLA code (1.6e-4 relative was seen on one machine), so they are
    compared at 1e-2, still far below what another data order changes (see the last check).
    """
    config = tmp_path / 'cifar10_tiny.py'
    config.write_text(CIFAR10_TINY)
    args = ['--config', str(config), '--config.num_train_steps=3',
            '--config.optimizer=sam', '--config.ascent_group_size=4', '--config.batch_size=16',
            '--config.log_every_steps=1', '--config.eval_every_steps=100',
            '--config.progress_bar=False']
    losses = {}
    for name, devices, shards in (('one', 1, 4), ('four', 4, 4), ('one_default', 1, 0)):
        result = run_cli([*args, '--workdir', str(tmp_path / name),
                          f'--config.data_shards={shards}'], mock_examples=128,
                         env=devices_env(devices))
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [r['train_loss'] for r in metrics.read_history(str(tmp_path / name))
                        if 'train_loss' in r]
    assert len(losses['one']) == 3
    assert losses['four'][0] == pytest.approx(losses['one'][0], rel=1e-5)
    assert losses['four'][1:] == pytest.approx(losses['one'][1:], rel=1e-2)
    # One shard per device (the default: here 1) is another data order, another run.
    assert losses['one_default'][0] != pytest.approx(losses['one'][0], rel=1e-3)


@pytest.mark.parametrize('flags,message', [
    (['--config.batch_size=30'],
     'error: --config.batch_size=30 must divide by the 4 devices; use a multiple of 4.'),
    (['--config.batch_size=24', '--config.data_shards=6'],
     'error: --config.data_shards=6 must be a multiple of the 4 devices (or 0: one per '
     'device).'),
])
def test_batch_or_shards_not_divisible_by_devices_is_one_line(tmp_path, flags, message):
    result = run_cli(['--config', 'experiments/configs/digits_resnet.py', '--workdir',
                      str(tmp_path / 'run'), '--config.num_train_steps=1', *flags, *TINY],
                     env=devices_env(4))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [message], result.stderr


@pytest.mark.parametrize('shards', [5, -1])
def test_data_shards_must_divide_the_batch(shards):
    config = digits_resnet.get_config()
    config.batch_size, config.data_shards = 64, shards
    with pytest.raises(errors.ConfigError, match=rf'--config.data_shards={shards} must be 0 '
                       r'\(one per device\) or divide --config.batch_size=64.'):
        task.validate_config(config)


@pytest.mark.parametrize('group,message', [
    (5, '--config.ascent_group_size=5 must be 0 (whole batch) or divide --config.batch_size=64.'),
    (-1, '--config.ascent_group_size=-1 must be 0 (whole batch) or divide'),
])
def test_ascent_group_size_must_divide_the_batch(group, message):
    config = digits_resnet.get_config()
    config.batch_size, config.ascent_group_size = 64, group
    with pytest.raises(errors.ConfigError, match=message.replace('(', r'\(').replace(')', r'\)')):
        task.validate_config(config)


def test_ascent_group_size_needs_a_sharpness_aware_optimizer():
    config = digits_resnet.get_config()
    config.batch_size, config.ascent_group_size, config.optimizer = 64, 16, 'sgd'
    with pytest.raises(errors.ConfigError, match='needs a sharpness-aware'):
        task.validate_config(config)


def test_unreachable_coordinator_fails_in_bounded_time(tmp_path):
    start = time.monotonic()
    result = run_cli(['--config', 'experiments/configs/digits_resnet.py', '--workdir',
                      str(tmp_path / 'run'), f'--coordinator_address=127.0.0.1:{free_port()}',
                      '--num_processes=2', '--process_id=1', '--distributed_timeout_s=5', *TINY],
                     timeout=120)
    assert time.monotonic() - start < 90
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
    assert len(lines) == 1 and 'Could not join the distributed run' in lines[0], result.stderr
    assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('flags,message', [
    (['--coordinator_address=nohost', '--num_processes=2', '--process_id=0'], 'is not HOST:PORT'),
    (['--coordinator_address=127.0.0.1:1234', '--num_processes=2', '--process_id=2'],
     '--process_id=2 must be in [0, 2)'),
    (['--num_processes=2'], 'Pass all of --coordinator_address'),
])
def test_bad_distributed_flags(flags, message):
    from experiments.runtime import distributed
    values = {'coordinator_address': None, 'num_processes': None, 'process_id': None}
    for flag in flags:
        key, value = flag[2:].split('=')
        values[key] = value if key == 'coordinator_address' else int(value)
    with pytest.raises(distributed.DistributedError, match=message.replace('[', r'\[')
                       .replace(')', r'\)')):
        distributed.initialize(**values)
    assert os.environ.get('JAX_COORDINATOR_ADDRESS') is None
