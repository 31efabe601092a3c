"""Reliability of the trainer: resume after kill -9, preemption, damaged checkpoints, non-finite
training, bad inputs and workdir safety.

The end-to-end tests run the real CLI (``python -m experiments.train``) in subprocesses on a
tiny digits config. They share one uninterrupted reference run and one XLA compilation cache
(also across pytest-xdist workers), so that each later process skips most of its compiling.
"""

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import vasso_jax
from experiments.image_classification import task
from experiments.runtime import checkpointing, errors, metrics, nonfinite, optimizers, preemption
from experiments.runtime import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAN_HELPER = os.path.join(REPO, 'tests', 'experiments', 'inject_nan.py')
TIMEOUT_S = 300  # per child process; a hung child fails the test instead of the suite
NUM_STEPS = 24
# The run every end-to-end test repeats: WRN-10-1 on the offline digits, VaSSO, 24 steps,
# a checkpoint every 4 (the last 2 kept).
CONFIG_TEXT = f'''
from experiments.configs import digits_resnet


def get_config():
    config = digits_resnet.get_config()
    config.model = 'wrn'
    config.model_kwargs = {{'depth': 10, 'widen_factor': 1, 'dtype': 'float32'}}
    config.batch_size = 32
    config.num_train_steps = {NUM_STEPS}
    config.log_every_steps = 4
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 4
    config.keep_checkpoints = 2
    config.eval_train = False
    config.progress_bar = False
    return config
'''


# --------------------------------------------------------------------------- helpers


class Cli:
    """Runs ``python -m experiments.train --config <tiny config> --workdir DIR [flags]``."""

    def __init__(self, root):
        self.config = os.path.join(root, 'tiny_config.py')
        self.env = {
            **os.environ,
            'PYTHONPATH': REPO,
            'JAX_PLATFORMS': 'cpu',
            'JAX_COMPILATION_CACHE_DIR': os.path.join(root, 'xla_cache'),
            'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
        }

    def command(self, workdir, *flags, module=('-m', 'experiments.train')):
        workdir = () if workdir is None else ('--workdir', str(workdir))
        return [sys.executable, *module, '--config', self.config, *workdir, *flags]

    def run(self, workdir, *flags, **kwargs):
        return subprocess.run(
            self.command(workdir, *flags, **kwargs),
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )

    @contextlib.contextmanager
    def start(self, workdir, log_prefix):
        """A background run (output in LOG_PREFIX.out/.err); killed if the test fails."""
        with open(f'{log_prefix}.out', 'w') as out, open(f'{log_prefix}.err', 'w') as err:
            process = subprocess.Popen(
                self.command(workdir), cwd=REPO, env=self.env, stdout=out, stderr=err
            )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=TIMEOUT_S)


def wait_for(path, process, log_prefix, timeout=TIMEOUT_S):
    """Polls until ``path`` exists; fails if ``process`` ends first."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            err = open(f'{log_prefix}.err').read()
            pytest.fail(f'the run ended (rc {process.returncode}) before {path}:\n{err[-3000:]}')
        if time.monotonic() > deadline:
            pytest.fail(f'{path} did not appear within {timeout} s')
        time.sleep(0.02)


def summary(workdir):
    with open(os.path.join(workdir, 'summary.json')) as f:
        return json.load(f)


def error_lines(stderr):
    """Lines of stderr that are not logging from the libraries (absl / XLA prefixes)."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and not re.match(r'[IWEF]\d{4} |WARNING:|E0000 ', line)
    ]


def snapshot(folder):
    """{relative path: sha256} of every file under ``folder`` but the lock file."""
    files = {}
    for path in glob.glob(os.path.join(folder, '**', '*'), recursive=True):
        rel = os.path.relpath(path, folder)
        if os.path.isfile(path) and rel != workdir_lib.LOCK_FILE:
            with open(path, 'rb') as f:
                files[rel] = hashlib.sha256(f.read()).hexdigest()
    return files


def steps_in(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


@pytest.fixture(scope='module')
def cli(tmp_path_factory):
    """The CLI helper, and an uninterrupted reference run made once per session.

    Under pytest-xdist the workers share the reference run and the compilation cache: the
    first worker to get here makes them, the others wait on a file lock.
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get('PYTEST_XDIST_WORKER'):
        shared = shared.parent
    root = os.path.join(shared, 'reliability_shared')
    os.makedirs(root, exist_ok=True)
    helper = Cli(root)
    with open(os.path.join(root, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(os.path.join(root, 'reference', 'summary.json')):
            with open(helper.config, 'w') as f:
                f.write(CONFIG_TEXT)
            result = helper.run(os.path.join(root, 'reference'))
            assert result.returncode == 0, result.stderr[-3000:]
    helper.reference = os.path.join(root, 'reference')
    helper.checksum = summary(helper.reference)['params_checksum']
    return helper


def tiny_config() -> ml_collections.ConfigDict:
    namespace = {}
    exec(compile(CONFIG_TEXT, 'tiny_config', 'exec'), namespace)  # noqa: S102 - our own text
    return namespace['get_config']()


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_rerun_is_bitwise(cli, tmp_path):
    seed = random.randrange(10**6)
    delay = random.Random(seed).uniform(0.0, 0.8)
    workdir, log = tmp_path / 'run', tmp_path / 'victim'
    with cli.start(workdir, log) as victim:
        wait_for(workdir / 'checkpoints' / '4', victim, log)
        time.sleep(delay)
        assert victim.poll() is None, f'the run ended before the kill (seed {seed})'
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=TIMEOUT_S)
    assert victim.returncode == -signal.SIGKILL
    killed_at = steps_in(workdir)[-1]

    result = cli.run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = summary(workdir)
    assert resumed['completed'] and resumed['steps'] == NUM_STEPS
    assert resumed['params_checksum'] == cli.checksum, f'seed {seed}, killed after {killed_at}'
    # The interrupted save (if any) never became a step, and its leftovers were removed.
    assert not glob.glob(str(workdir / 'checkpoints' / '*tmp*'))
    assert not os.path.exists(workdir / checkpointing.UNREADABLE_DIR)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_0_a_second_run_is_refused(cli, tmp_path):
    workdir, log = tmp_path / 'run', tmp_path / 'first'
    with cli.start(workdir, log) as first:
        wait_for(workdir / 'checkpoints' / '4', first, log)
        first.send_signal(signal.SIGSTOP)  # paused, it still holds the workdir
        try:
            second = cli.run(workdir)
            first.send_signal(signal.SIGTERM)  # delivered when it continues
        finally:
            first.send_signal(signal.SIGCONT)
        first.wait(timeout=TIMEOUT_S)
    out, err = open(f'{log}.out').read(), open(f'{log}.err').read()

    assert second.returncode == 2
    assert error_lines(second.stderr) == [
        f'error: Workdir {workdir} is in use by another run (pid {first.pid}); wait for it to '
        'end or pass another --workdir.'
    ]
    assert first.returncode == 0, err[-3000:]
    stopped = summary(workdir)['steps']
    assert 4 <= stopped < NUM_STEPS and not summary(workdir)['completed']
    assert out.strip().splitlines()[-1] == (
        f'Preempted at step {stopped} (SIGTERM); rerun the same command to resume.'
    )
    assert steps_in(workdir)[-1] == stopped  # the checkpoint of the step it stopped at

    result = cli.run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(workdir)['params_checksum'] == cli.checksum


@pytest.mark.slow
def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(cli, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(cli.reference, workdir)
    assert steps_in(workdir) == [20, 24]
    for path in glob.glob(str(workdir / 'checkpoints' / '24' / '**' / 'd' / '*'), recursive=True):
        os.truncate(path, os.path.getsize(path) // 2)

    result = cli.run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if 'Skipped the checkpoint' in line]
    assert len(warnings) == 1 and 'at step 24: it is unreadable' in warnings[0], result.stderr
    assert 'resumed from step 20' in warnings[0]
    assert summary(workdir)['params_checksum'] == cli.checksum  # steps 21-24 trained again
    assert steps_in(workdir) == [20, 24]
    assert os.listdir(workdir / checkpointing.UNREADABLE_DIR) == ['24']


@pytest.mark.slow
def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(cli, tmp_path):
    workdir = tmp_path / 'run'
    # The learning rate is NaN at update 10 only: the params after step 10 are NaN.
    result = cli.run(workdir, module=(NAN_HELPER, '9'))
    assert result.returncode == 3, result.stderr[-3000:]
    assert error_lines(result.stderr) == [
        'error: Non-finite parameters at step 10; stopped, the last good checkpoint (step 8) '
        'is kept. Lower --config.learning_rate (or --config.rho) and rerun with '
        '--allow_config_change, or skip such steps with --config.skip_nonfinite=True.'
    ]
    assert steps_in(workdir) == [4, 8]  # step 12 was due, but its state was not finite
    assert max(r['step'] for r in metrics.read_history(str(workdir))) == 8
    manager = checkpointing.make_manager(str(workdir), keep=2)
    saved = manager.restore(8, args=ocp.args.StandardRestore())
    manager.close()
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved['params']))
    # Without the injected NaN, the same command continues from step 8 to the reference.
    result = cli.run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(workdir)['params_checksum'] == cli.checksum


# --------------------------------------------------------------------------- bad inputs

LINKS = ', '.join(optimizers.link_factories())
WRN_KWARGS = 'depth, widen_factor, dropout_rate, shortcut, base_width, dtype'
# (id, config overrides, exact message) for train_and_evaluate; every one is a ConfigError.
BAD_CONFIGS = [
    (
        'optimizer',
        {'optimizer': 'adam'},
        f"--config.optimizer='adam' is not one of sgd, {LINKS}.",
    ),
    (
        'base_optimizer',
        {'base_optimizer': 'lion2'},
        "--config.base_optimizer='lion2' is not an optax optimiser taking a learning rate (e.g. "
        'sgd, adamw, lion, adam, rmsprop).',
    ),
    (
        'base_optimizer_kwargs',
        {'base_optimizer_kwargs': {'b1': 0.9}},
        '--config.base_optimizer_kwargs.b1 is not an argument of optax.sgd; valid: momentum, '
        'nesterov, accumulator_dtype.',
    ),
    (
        'optimizer_kwargs',
        {'optimizer': 'friendly_sam', 'optimizer_kwargs': {'sigmaa': 1.0}},
        '--config.optimizer_kwargs.sigmaa is not an argument of vasso_jax.friendly_sam; valid: '
        'sigma, lmbda, eps, perturbed_dtype.',
    ),
    (
        'dataset',
        {'dataset': 'mnist'},
        "--config.dataset='mnist' is not one of cifar10, cifar100, cifar10_n, digits, "
        'fashion_mnist.',
    ),
    (
        'model',
        {'model': 'vgg16'},
        "--config.model='vgg16' is not one of cnn, resnet18, resnet34, wrn, wrn28_10, "
        'wrn16_4, pyramidnet, pyramidnet110, pyramidnet272.',
    ),
    # The library's own checks are the validation; the message names the flag.
    (
        'rho<0',
        {'rho': -0.1},
        '--config.rho: sharpness_aware: rho=-0.1 is invalid; expected a finite value in '
        '[0, inf).',
    ),
    (
        'rho=nan',
        {'rho': float('nan')},
        '--config.rho: sharpness_aware: rho=nan is invalid; expected a finite value in [0, inf).',
    ),
    (
        'theta=0',
        {'theta': 0.0},
        '--config.theta: vasso_direction: theta=0.0 is invalid; expected a finite value in '
        '(0, 1].',
    ),
    (
        'theta>1',
        {'theta': 1.5},
        '--config.theta: vasso_direction: theta=1.5 is invalid; expected a finite value in '
        '(0, 1].',
    ),
    (
        'friendly_sam sigma<0',
        {'optimizer': 'friendly_sam', 'optimizer_kwargs': {'sigma': -1.0}},
        '--config.optimizer_kwargs.sigma: friendly_direction: sigma=-1.0 is invalid; expected a '
        'finite value in [0, 1].',
    ),
    (
        'every_k=0',
        {'every_k': 0},
        '--config.every_k: sharpness_aware: every_k=0 is invalid; expected an integer >= 1.',
    ),
    ('batch_size=0', {'batch_size': 0}, '--config.batch_size must be >= 1, got 0.'),
    (
        'batch_size>data',
        {'batch_size': 2000},
        '--config.batch_size=2000 exceeds the 1438 training examples of digits; lower it.',
    ),
    ('eval_batch_size=0', {'eval_batch_size': 0}, '--config.eval_batch_size must be >= 1, got 0.'),
    ('lr=0', {'learning_rate': 0.0}, '--config.learning_rate must be > 0, got 0.0 (e.g. 0.05).'),
    ('lr<0', {'learning_rate': -0.1}, '--config.learning_rate must be > 0, got -0.1 (e.g. 0.05).'),
    (
        'epochs=0',
        {'num_epochs': 0, 'num_train_steps': -1},
        'Set --config.num_epochs or --config.num_train_steps to a value > 0.',
    ),
    (
        'momentum=1',
        {'momentum': 1.0},
        '--config.momentum must be in [0, 1), got 1.0 (e.g. 0.9; 0 turns momentum off).',
    ),
    (
        'weight_decay<0',
        {'weight_decay': -1e-4},
        '--config.weight_decay must be >= 0, got -0.0001 (e.g. 5e-4).',
    ),
    (
        'label_noise=1',
        {'label_noise': 1.0},
        '--config.label_noise must be in [0, 1), got 1.0 (the fraction of labels flipped).',
    ),
    (
        'label_noise<0',
        {'label_noise': -0.1},
        '--config.label_noise must be in [0, 1), got -0.1 (the fraction of labels flipped).',
    ),
    (
        'asymmetric noise',
        {'noise_type': 'asymmetric'},
        "--config.noise_type='asymmetric' has class maps for cifar10, fashion_mnist only, got "
        "digits; use 'symmetric'.",
    ),
    (
        'noise_type',
        {'noise_type': 'pairflip'},
        "--config.noise_type='pairflip' is not one of symmetric, asymmetric.",
    ),
    (
        'cutout>image',
        {'cutout_size': 16},
        '--config.cutout_size must be in [0, 8] for the 8x8 images of digits, got 16; 0 turns '
        'Cutout off.',
    ),
    (
        'crop_padding>image',
        {'crop_padding': 9},
        '--config.crop_padding must be in [0, 8] for the 8x8 images of digits, got 9.',
    ),
    ('cutout_prob>1', {'cutout_prob': 1.5}, '--config.cutout_prob must be in [0, 1], got 1.5.'),
    (
        'validation_size<0',
        {'validation_size': -1},
        '--config.validation_size must be in [0, 1438) for digits, got -1.',
    ),
    (
        'keep_checkpoints=0',
        {'keep_checkpoints': 0},
        '--config.keep_checkpoints must be >= 1, got 0.',
    ),
    (
        'wrn depth',
        {'model_kwargs.depth': 12},
        '--config.model_kwargs.depth must be 6n+4 with n >= 1 for a WideResNet (e.g. 16, 28), '
        'got 12.',
    ),
    (
        'unknown model kwarg',
        {'model_kwargs.width': 4},
        f'--config.model_kwargs.width is not an argument of wrn; valid: {WRN_KWARGS}.',
    ),
    (
        'named model kwarg',
        {'model': 'wrn16_4', 'model_kwargs.depth': 10},
        '--config.model_kwargs.depth=10 contradicts --config.model=wrn16_4 (depth=16); use '
        '--config.model=wrn or pyramidnet to set depth.',
    ),
    (
        'dtype',
        {'model_kwargs.dtype': 'float33'},
        "--config.model_kwargs.dtype='float33' is not a dtype; use float32 or bfloat16.",
    ),
]


@pytest.fixture
def used_workdir(tmp_path):
    """A workdir that looks like a run's: its config, metrics, a checkpoint folder."""
    workdir = tmp_path / 'run'
    (workdir / 'checkpoints' / '4').mkdir(parents=True)
    (workdir / 'checkpoints' / '4' / 'state').write_bytes(b'\x00\x01 saved state')
    workdir_lib.save_config(str(workdir), tiny_config())
    (workdir / 'metrics.jsonl').write_text('{"step": 4, "train_loss": 2.3}\n')
    return workdir


@pytest.mark.parametrize(
    'overrides,message', [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_bad_config_is_one_exact_line_and_loses_nothing(used_workdir, overrides, message):
    config = tiny_config()
    for key, value in overrides.items():
        *parents, leaf = key.split('.')
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    before = snapshot(used_workdir)
    with pytest.raises(errors.ConfigError) as error:
        task.train_and_evaluate(config, str(used_workdir))
    assert str(error.value) == message
    assert snapshot(used_workdir) == before


def _busy(workdir):
    with workdir_lib.lock(str(workdir)):
        task.train_and_evaluate(tiny_config(), str(workdir))


def _changed_config(workdir):
    config = tiny_config()
    config.rho, config.model_kwargs.depth = 0.3, 16
    config.log_every_steps = 2  # exempt: it changes no maths
    task.train_and_evaluate(config, str(workdir))


def _garbled_config_json(workdir):
    (workdir / 'config.json').write_text('not json')  # what a hand edit might leave
    before = snapshot(workdir)
    try:
        task.train_and_evaluate(tiny_config(), str(workdir))
    finally:
        assert snapshot(workdir) == before  # left for the user to repair


# (id, call, exception type, exact message) for other misuse: workdir, API, library.
BAD_CALLS = [
    (
        'workdir busy',
        _busy,
        workdir_lib.WorkdirError,
        'Workdir {workdir} is in use by another run (pid {pid}); wait for it to end or pass '
        'another --workdir.',
    ),
    (
        'config changed',
        _changed_config,
        workdir_lib.WorkdirError,
        'Workdir {workdir} was started with another config (model_kwargs.depth: 10 -> 16, rho: '
        '0.5 -> 0.3); rerun with --allow_config_change to continue it with this one, or pass '
        'another --workdir.',
    ),
    (
        'config.json garbled',
        _garbled_config_json,
        workdir_lib.WorkdirError,
        '{workdir}/config.json is unreadable (Expecting value: line 1 column 1 (char 0)); repair '
        'or delete it, or pass another --workdir.',
    ),
    (
        'workdir is a file',
        lambda w: task.train_and_evaluate(tiny_config(), str(w / 'metrics.jsonl')),
        workdir_lib.WorkdirError,
        '--workdir {workdir}/metrics.jsonl is a file, not a folder; pass a folder.',
    ),
    (
        'config not a ConfigDict',
        lambda w: task.train_and_evaluate(tiny_config().to_dict(), str(w)),
        TypeError,
        'config must be an ml_collections.ConfigDict (e.g. '
        'experiments.configs.default.get_config()), got dict.',
    ),
    (
        'stop_at_step=0',
        lambda w: task.train_and_evaluate(tiny_config(), str(w), stop_at_step=0),
        ValueError,
        'stop_at_step must be None or an int >= 1, got 0.',
    ),
    (
        'library theta',
        lambda w: vasso_jax.vasso(0.1, theta=2.0),
        ValueError,
        'vasso_direction: theta=2.0 is invalid; expected a finite value in (0, 1].',
    ),
    (
        'library rho',
        lambda w: vasso_jax.sam(rho=-1.0),
        ValueError,
        'sharpness_aware: rho=-1.0 is invalid; expected a finite value in [0, inf).',
    ),
]


@pytest.mark.parametrize(
    'call,kind,message', [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_misuse_is_one_exact_line_and_loses_nothing(used_workdir, call, kind, message):
    before = snapshot(used_workdir)
    with pytest.raises(kind) as error:
        call(used_workdir)
    assert str(error.value) == message.format(workdir=used_workdir, pid=os.getpid())
    if call is not _garbled_config_json:  # which checks its own workdir
        assert snapshot(used_workdir) == before


# (id, flags, exact stderr line) for the CLI; each exits with 2 before touching the workdir.
BAD_FLAGS = [
    (
        'no workdir',
        [],
        'error: --workdir is required (Folder for checkpoints, metrics and summary).',
    ),
    (
        'unknown flag',
        ['--learning_rate=0.1'],
        'error: unknown flag --learning_rate; --helpfull lists the flags.',
    ),
    (
        'unknown config key',
        ['--config.rhoo=0.1'],
        'error: --config.rhoo is not a key of the config (did you mean rho?); the config file '
        'lists its keys.',
    ),
    (
        'value of the wrong type',
        ['--config.rho=abc'],
        "error: flag --config.rho=abc: could not convert string to float: 'abc'",
    ),
    (
        'positional argument',
        ['resume'],
        'error: unexpected arguments: resume; flags take the form --name=value.',
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize('flags,line', [c[1:] for c in BAD_FLAGS], ids=[c[0] for c in BAD_FLAGS])
def test_bad_cli_flags_exit_2_with_one_exact_line(cli, used_workdir, flags, line):
    before = snapshot(used_workdir)
    result = cli.run(used_workdir if flags else None, *flags)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result.stderr) == [line]
    assert snapshot(used_workdir) == before


# --------------------------------------------------------------------------- units


def toy_state(step):
    return {'step': jnp.int32(step), 'w': jnp.arange(100.0) + step, 'b': {'x': jnp.ones(3)}}


def save_steps(workdir, steps, keep=3):
    manager = checkpointing.make_manager(str(workdir), keep=keep)
    for step in steps:
        manager.save(step, args=ocp.args.StandardSave(toy_state(step)))
    manager.wait_until_finished()
    manager.close()


def damage(step_dir, how):
    files = [
        p for p in glob.glob(os.path.join(step_dir, '**', '*'), recursive=True) if os.path.isfile(p)
    ]
    if how == 'truncated':
        for path in files:
            if os.sep + 'd' + os.sep in path:
                os.truncate(path, os.path.getsize(path) // 2)
    elif how == 'garbage':
        for path in files:
            with open(path, 'r+b') as f:
                f.write(b'\x00garbage' * 4)
    elif how == 'emptied':
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)


@pytest.mark.parametrize('how', ['truncated', 'garbage', 'emptied'])
def test_restore_skips_an_unreadable_latest_step(tmp_path, caplog, how):
    save_steps(tmp_path, [1, 2, 3])
    damage(tmp_path / 'checkpoints' / '3', how)
    manager = checkpointing.make_manager(str(tmp_path), keep=3)
    with caplog.at_level(logging.WARNING):
        state = checkpointing.restore_latest(manager, toy_state(0))
    assert int(state['step']) == 2
    np.testing.assert_array_equal(state['w'], toy_state(2)['w'])
    [warning] = [r.getMessage() for r in caplog.records if 'Skipped' in r.getMessage()]
    assert warning.startswith('Skipped the checkpoint at step 3: it is unreadable (')
    assert warning.endswith(
        f'Moved it to {tmp_path}/checkpoints_unreadable/3 and resumed from step 2.'
    )
    assert manager.all_steps() == [1, 2]
    manager.save(3, args=ocp.args.StandardSave(toy_state(3)))  # the step can be saved again
    manager.wait_until_finished()
    assert manager.latest_step() == 3
    manager.close()


def test_an_interrupted_save_never_becomes_latest(tmp_path):
    save_steps(tmp_path, [1, 2])
    # What a save killed before its final rename leaves: a temporary folder.
    leftover = tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1234567'
    shutil.copytree(tmp_path / 'checkpoints' / '2', leftover)
    manager = checkpointing.make_manager(str(tmp_path), keep=3)
    assert manager.latest_step() == 2
    assert int(checkpointing.restore_latest(manager, toy_state(0))['step']) == 2
    manager.save(3, args=ocp.args.StandardSave(toy_state(3)))  # what the resumed run does next
    manager.wait_until_finished()
    manager.close()
    assert steps_in(tmp_path) == [1, 2, 3]
    assert not leftover.exists()  # removed once the next run opened the folder


def test_no_readable_checkpoint_is_a_clear_error(tmp_path):
    save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        damage(tmp_path / 'checkpoints' / str(step), 'garbage')
    manager = checkpointing.make_manager(str(tmp_path), keep=3)
    with pytest.raises(checkpointing.CheckpointMismatchError) as error:
        checkpointing.restore_latest(manager, toy_state(0))
    assert str(error.value) == (
        f'No checkpoint in {tmp_path}/checkpoints is readable (steps 2, 1); delete that folder '
        'to start the run over, or pass a new --workdir.'
    )
    assert steps_in(tmp_path) == [1, 2]  # nothing moved or deleted


def test_a_checkpoint_of_another_structure_is_a_mismatch_not_a_skip(tmp_path):
    save_steps(tmp_path, [1, 2])
    manager = checkpointing.make_manager(str(tmp_path), keep=3)
    other = {**toy_state(0), 'extra': jnp.zeros(2)}
    with pytest.raises(checkpointing.CheckpointMismatchError, match='does not fit this config'):
        checkpointing.restore_latest(manager, other)
    assert steps_in(tmp_path) == [1, 2]


def test_the_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    with workdir_lib.lock(str(tmp_path)):
        assert (tmp_path / workdir_lib.LOCK_FILE).read_text() == f'{os.getpid()}\n'
        with pytest.raises(workdir_lib.WorkdirError, match=f'pid {os.getpid()}'):
            with workdir_lib.lock(str(tmp_path)):
                pass
    with workdir_lib.lock(str(tmp_path)):  # released
        pass


def test_config_check_exempts_keys_that_change_no_maths(tmp_path, caplog):
    config = tiny_config()
    workdir_lib.save_config(str(tmp_path), config)
    for key in workdir_lib.EXEMPT_KEYS:
        assert key in config, key
    config.log_every_steps, config.progress_bar, config.keep_checkpoints = 1, True, 5
    workdir_lib.check_config(str(tmp_path), config)  # no error
    config.seed = 1
    with pytest.raises(workdir_lib.WorkdirError, match=r'\(seed: 3107 -> 1\)'):
        workdir_lib.check_config(str(tmp_path), config)
    with caplog.at_level(logging.WARNING):
        workdir_lib.check_config(str(tmp_path), config, allow_change=True)
    assert any('seed: 3107 -> 1' in r.getMessage() for r in caplog.records)


def test_a_workdir_older_than_a_config_key_ran_at_its_default(tmp_path):
    config = tiny_config()
    workdir_lib.save_config(str(tmp_path), config)
    saved = json.loads((tmp_path / 'config.json').read_text())
    del saved['data_shards']  # written before the key existed
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    defaults = task.TASK.default_config()  # data_shards=0 there: no change
    workdir_lib.check_config(str(tmp_path), config, defaults=defaults)
    config.data_shards = 4
    with pytest.raises(workdir_lib.WorkdirError, match=r'\(data_shards: 0 -> 4\)'):
        workdir_lib.check_config(str(tmp_path), config, defaults=defaults)


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_only_requests_a_stop(sig):
    before = signal.getsignal(sig)
    with preemption.Guard() as guard:
        assert not guard.should_stop(1)
        os.kill(os.getpid(), sig)  # no KeyboardInterrupt, no exit
        deadline = time.monotonic() + 10
        while not guard.requested and time.monotonic() < deadline:
            time.sleep(0.01)  # the handler runs in the main thread between bytecodes
        assert guard.should_stop(2) and guard.signal_name == sig.name
    assert signal.getsignal(sig) is before


def test_nonfinite_guard_records_the_first_bad_step_and_quantity():
    class State(NamedTuple):
        step: jax.Array
        params: jax.Array
        batch_stats: tuple = ()
        opt_state: tuple = ()

    def train_step(state, metrics, lr):  # the learning rate of update 3 is NaN
        loss = jnp.sum(state.params**2)
        state = State(step=state.step + 1, params=state.params - lr[state.step])
        return state, {'loss': metrics['loss'] + loss, 'grad_norm': metrics['grad_norm'] + 1.0}

    step = jax.jit(nonfinite.guard(train_step))
    lr = jnp.array([0.1, 0.1, jnp.nan, 0.1, 0.1])
    state = State(step=jnp.int32(0), params=jnp.ones(2))
    metrics = nonfinite.with_status({'loss': 0.0, 'grad_norm': 0.0})
    for _ in range(5):
        state, metrics = step(state, metrics, lr)
    fetched = jax.device_get(metrics)
    assert (int(fetched['nonfinite_step']), int(fetched['nonfinite_what'])) == (3, 2)
    assert set(nonfinite.strip(fetched)) == {'loss', 'grad_norm'}

    class Checkpoints:
        wait_until_finished = staticmethod(lambda: None)
        latest_step = staticmethod(lambda: 2)

    with pytest.raises(
        nonfinite.NonFiniteError,
        match=r'^Non-finite parameters at step 3; '
        r'stopped, the last good checkpoint \(step 2\) is kept\.',
    ):
        nonfinite.check(fetched, Checkpoints, nonfinite.quantities(state, fetched))
