"""Failures of the environment: each is one line with a defined exit code and loses nothing.

Faults are injected deterministically: a file-size limit (``RLIMIT_FSIZE``, which binds root
too) in a child process, folders that cannot be written even by root (``/sys``), ENOSPC by
patching ``os.fsync``, a second SIGINT while the first one's checkpoint is saved, and bad
config values. The end-to-end test reuses the CLI helper, reference run and compilation cache
of ``test_reliability.py``.
"""

import errno
import os
import resource
import signal
import stat
import subprocess
import sys
import time

import pytest
from absl import flags

from experiments.image_classification import task
from experiments.runtime import cli as cli_lib
from experiments.runtime import errors, failures
from experiments.runtime import workdir as workdir_lib
from tests.experiments.test_reliability import (  # noqa: F401, F811 - fixtures
    NUM_STEPS,
    REPO,
    TIMEOUT_S,
    cli,
    error_lines,
    snapshot,
    steps_in,
    summary,
    tiny_config,
    used_workdir,
    wait_for,
)


def _unwritable_folder(tmp_path, how):
    """A folder this process cannot create files in, or a skip saying why there is none."""
    if how == 'chmod':
        folder = tmp_path / 'read_only'
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            (folder / 'probe').write_text('')
        except OSError:
            return folder
        pytest.skip('chmod does not stop this user from writing (root)')
    folder = '/sys/kernel'  # sysfs refuses new files even to root
    if not os.path.isdir(folder) or os.access(folder, os.W_OK) and _can_create(folder):
        pytest.skip(f'{folder} is not an unwritable folder here')
    return folder


def _can_create(folder):
    try:
        os.close(os.open(os.path.join(folder, 'probe'), os.O_CREAT | os.O_WRONLY))
    except OSError:
        return False
    os.remove(os.path.join(folder, 'probe'))
    return True


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_file_size_limit_then_double_sigint_then_rerun_is_bitwise(cli, tmp_path):  # noqa: F811
    """Exit 4 at the first save (file-size limit), 130 on a second SIGINT during a save; the
    reruns resume and end bitwise on the uninterrupted run."""
    workdir = tmp_path / 'run'
    if not _can_create('/sys/kernel'):  # a checkpoints folder even root cannot write
        workdir.mkdir()
        (workdir / 'checkpoints').symlink_to('/sys/kernel')
        result = cli.run(workdir)
        assert result.returncode == errors.EXIT_ENVIRONMENT, result.stderr[-3000:]
        assert error_lines(result.stderr) == [
            f'error: Cannot write {workdir}/checkpoints/4.orbax-checkpoint-tmp: Operation not '
            'permitted (EPERM); make it writable, then rerun the same command to resume from '
            f'the last complete checkpoint (the traceback is in {workdir}/error.log).'
        ]
        (workdir / 'checkpoints').unlink()

    def limit_file_size():  # config.json and metrics fit; an array file of a checkpoint not
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = subprocess.run(cli.command(workdir), cwd=REPO, env=cli.env, capture_output=True,
                            text=True, timeout=TIMEOUT_S, preexec_fn=limit_file_size)
    assert result.returncode == errors.EXIT_ENVIRONMENT, result.stderr[-3000:]
    [line] = error_lines(result.stderr)
    assert line.startswith(f'error: Cannot write {workdir}/checkpoints/4.orbax-checkpoint-tmp')
    assert line.endswith(
        ': File too large (EFBIG); raise the file-size limit (ulimit -f), then rerun the same '
        'command to resume from the last complete checkpoint (the traceback is in '
        f'{workdir}/error.log).'
    )
    assert 'Traceback' in (workdir / failures.ERROR_LOG).read_text()
    assert steps_in(workdir) == []

    log = tmp_path / 'twice'
    with cli.start(workdir, log) as run:
        wait_for(workdir / 'checkpoints' / '8', run, log)
        run.send_signal(signal.SIGINT)
        # The second SIGINT once the first is handled (two sent before that arrive as one),
        # i.e. while the run finishes its step and saves: a fixed delay can miss that window.
        deadline = time.monotonic() + TIMEOUT_S
        while 'Received SIGINT' not in open(f'{log}.err').read():
            assert run.poll() is None and time.monotonic() < deadline, 'the first SIGINT'
            time.sleep(0.001)
        run.send_signal(signal.SIGINT)
        run.wait(timeout=TIMEOUT_S)
    err = open(f'{log}.err').read()
    assert run.returncode == 130, err[-3000:]
    assert error_lines(err) == [
        'Received SIGINT: saving a checkpoint after this step (send it again to stop at once).',
        'error: Stopped at once by a second SIGINT; the checkpoints completed before are kept '
        '(an unfinished save is discarded); rerun the same command to resume.',
    ]
    assert steps_in(workdir)[-1] >= 8

    result = cli.run(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(workdir)['steps'] == NUM_STEPS
    assert summary(workdir)['params_checksum'] == cli.checksum


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize('how', ['chmod', 'sysfs'])
def test_an_unwritable_workdir_is_one_line(tmp_path, how):
    folder = _unwritable_folder(tmp_path, how)
    with pytest.raises(errors.EnvironmentFailure) as error:
        task.train_and_evaluate(tiny_config(), str(folder))
    assert str(error.value).startswith(f'Cannot write to --workdir {folder} (')
    assert str(error.value).endswith('); make it writable or pass another --workdir.')
    assert error.value.errno in (errno.EACCES, errno.EPERM, errno.EROFS)


def test_a_full_disk_keeps_the_saved_file_and_logs_the_traceback(used_workdir, monkeypatch):  # noqa: F811
    before = snapshot(used_workdir)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, 'fsync', full)
    config = tiny_config()
    config.log_every_steps = 2
    with pytest.raises(errors.EnvironmentFailure) as error:
        with failures.reported(str(used_workdir)):
            workdir_lib.save_config(str(used_workdir), config)
    assert str(error.value) == (
        f'Cannot write {used_workdir}: No space left on device (ENOSPC); free some space, then '
        'rerun the same command to resume from the last complete checkpoint (the traceback is '
        f'in {used_workdir}/error.log).'
    )
    after = snapshot(used_workdir)
    assert 'OSError: [Errno 28]' in (used_workdir / failures.ERROR_LOG).read_text()
    del after[failures.ERROR_LOG]
    assert after == before  # the old config.json is whole, no temporary file is left


def test_an_os_error_code_in_a_tensorstore_message_is_recognised():
    error = ValueError("OUT_OF_RANGE: Failed writing: \"/w/x\": [os_error_code='28']")
    assert failures.os_errno(error) == errno.ENOSPC
    assert failures.os_errno(ValueError('a bug')) is None


def test_too_long_a_workdir_is_refused_before_anything_is_created(tmp_path):
    limit = os.pathconf(tmp_path, 'PC_PATH_MAX')
    workdir = tmp_path
    while len(str(workdir)) < limit - 150:  # fits the OS; orbax's longer names would not
        workdir = workdir / ('a' * 100)
    with pytest.raises(workdir_lib.WorkdirError) as error:
        task.train_and_evaluate(tiny_config(), str(workdir))
    assert str(error.value).startswith(f'--workdir is {len(str(workdir))} bytes long (absolute)')
    assert str(error.value).endswith('bytes.')
    assert os.listdir(tmp_path) == []


def test_closed_event_loop_reports_are_dropped_and_others_kept(monkeypatch):
    class Leftover:  # what a read of a damaged checkpoint leaves behind
        def __init__(self, message):
            self.message = message

        def __del__(self):
            raise RuntimeError(self.message)

    reported = []
    monkeypatch.setattr(sys, 'unraisablehook', lambda u: reported.append(str(u.exc_value)))
    with failures.quiet_closed_event_loops():
        Leftover('Event loop is closed')
        Leftover('another failure')
    Leftover('Event loop is closed')  # outside: reported again
    assert reported == ['another failure', 'Event loop is closed']


# --------------------------------------------------------------------------- bad values

BAD_VALUES = [
    ('width=0', {'model': 'resnet18', 'model_kwargs': {'width': 0}},
     '--config.model_kwargs.width must be an integer >= 1, got 0.'),
    ('width<0', {'model': 'cnn', 'model_kwargs': {'width': -4}},
     '--config.model_kwargs.width must be an integer >= 1, got -4.'),
    ('widen_factor=0', {'model_kwargs.widen_factor': 0},
     '--config.model_kwargs.widen_factor must be an integer >= 1, got 0.'),
    ('alpha<0', {'model': 'pyramidnet', 'model_kwargs': {'depth': 8, 'alpha': -5.0}},
     '--config.model_kwargs.alpha must be a number in [0, 1e6) (the widening over the network, '
     'e.g. 270), got -5.0.'),
    ('seed>=2**32', {'seed': 2**32},
     '--config.seed must be an integer in [0, 2**32), got 4294967296.'),
    ('noise_seed<0', {'noise_seed': -1},
     '--config.noise_seed must be an integer in [0, 2**32), got -1.'),
]


@pytest.mark.parametrize('overrides,message', [c[1:] for c in BAD_VALUES],
                         ids=[c[0] for c in BAD_VALUES])
def test_bad_value_is_one_line_and_creates_no_workdir(tmp_path, overrides, message):
    config = tiny_config()
    for key, value in overrides.items():
        parent, _, leaf = key.rpartition('.')
        (config[parent] if parent else config)[leaf] = value
    with pytest.raises(errors.ConfigError) as error:
        task.train_and_evaluate(config, str(tmp_path / 'new' / 'run'))
    assert str(error.value) == message
    assert os.listdir(tmp_path) == []


def test_data_not_prepared_leaves_no_workdir(tmp_path):
    config = tiny_config()
    config.dataset, config.data_dir = 'cifar10', str(tmp_path / 'no_data')
    with pytest.raises(errors.BadInputError, match='is not prepared'):
        task.train_and_evaluate(config, str(tmp_path / 'new' / 'run'))
    assert os.listdir(tmp_path) == []


@pytest.fixture
def train_flags():
    """``experiments.train``'s flags, parsed in this process and reset afterwards."""
    import experiments.train  # noqa: F401 - defines --config and --workdir

    yield
    flags.FLAGS.unparse_flags()


@pytest.mark.parametrize('text,line', [
    ('X = 1\n', '--config={path} has no get_config(); a config file defines get_config() '
                'returning an ml_collections.ConfigDict.'),
    ('def get_config():\n    return None\n',
     '--config={path}: its get_config() returned None; it must return an '
     'ml_collections.ConfigDict (a missing return statement?).'),
], ids=['no get_config', 'returns None'])
def test_a_config_file_without_a_config_is_named(tmp_path, capsys, train_flags, text, line):
    path = tmp_path / 'bad_config.py'
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        cli_lib.parse_flags([sys.argv[0], '--config', str(path), '--workdir', str(tmp_path)])
    assert exit_.value.code == errors.EXIT_BAD_INPUT
    assert capsys.readouterr().err == f'error: {line.format(path=path)}\n'
