"""Command-line plumbing shared by the entry points: every expected failure is one line.

``app.run(main, flags_parser=cli.parse_flags)`` replaces absl's usage dump (exit code 1) and
ml_collections' tracebacks (a missing config file, one without ``get_config``, an unknown
``--config.KEY``) with one line on stderr that names the flag, and exit code 2, like every
other bad input of the trainer. The exit codes (``runtime/errors.py``) are the same for
``experiments.train``, ``experiments.demo`` and ``experiments.reproduce``:

- 0: done, or preempted after a checkpoint (rerun the command to resume);
- 2: bad input (flags, config, workdir, checkpoint, data);
- 3: non-finite training (see ``runtime/nonfinite.py``);
- 4: the environment refused a write (disk full, file-size limit, unwritable folder); the
  traceback is in ``WORKDIR/error.log``;
- 128 + N: stopped at once by a second signal N (130: SIGINT, 143: SIGTERM).
"""

import contextlib
import os
import re
import signal
import sys
import threading

import jax
from absl import flags

from experiments.runtime import errors, nonfinite, preemption

EXIT_BAD_INPUT = errors.EXIT_BAD_INPUT
EXIT_NONFINITE = errors.EXIT_NONFINITE
EXIT_ENVIRONMENT = errors.EXIT_ENVIRONMENT


def fail(message: str, code: int = EXIT_BAD_INPUT):
    """Prints ``error: <message>`` (one line) on stderr and exits with ``code``.

    A process of a multi-process run exits at once (``os._exit``): every process stops on the
    same error, and the interpreter's exit runs JAX's distributed shutdown, which waits at a
    barrier and was seen to hang under load (both processes had printed their line; process 0
    was still running two minutes later).
    """
    print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
    if jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


@contextlib.contextmanager
def exit_on_run_errors():
    """Turns the expected failures of a training run into one line and an exit code.

    Bad input (data not prepared, config, workdir, checkpoint, distributed flags) exits 2,
    non-finite training 3, a write the machine refuses 4 (``errors.EnvironmentFailure``), a
    second signal 128 + N (``preemption.exits_at_once``), and a preemption prints how to resume
    and exits 0. SIGXFSZ is ignored meanwhile, so that a write past the file-size limit
    (``ulimit -f``) fails with ``EFBIG`` and is reported like a full disk, instead of killing
    the process.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        with preemption.exits_at_once():
            yield
    except errors.BadInputError as e:
        fail(e)
    except nonfinite.NonFiniteError as e:
        fail(e, EXIT_NONFINITE)
    except errors.EnvironmentFailure as e:
        # At once: orbax's background threads of a failed save wait minutes for a signal that
        # never comes, and the interpreter would join them before exiting.
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_ENVIRONMENT)
    except preemption.Interrupted as e:
        fail(e, e.exit_code)
    except preemption.Preempted as e:
        print(e)
        sys.exit(0)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses ``argv`` into ``flags.FLAGS`` (absl's ``flags_parser``); bad flags exit with 2."""
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # flags.Error, and what config files and overrides raise
        fail(_config_load_error() or _describe(e, argv))
    load_error = _config_load_error()
    if load_error:
        fail(load_error)
    none_error = _config_returned_none(argv)
    if none_error:
        fail(none_error)
    if len(rest) > 1:
        fail(f'unexpected arguments: {" ".join(rest[1:])}; flags take the form --name=value.')
    return rest


def _config_load_error() -> str | None:
    """The error of a config file that failed to load (ml_collections raises it on access)."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        try:
            hasattr(flag.value, 'keys')  # such a config raises its error on any attribute
        except Exception as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            return f'--{name}={flag.serialize().partition("=")[2]} could not be loaded: {lines[-1]}'
    return None


def _describe(error: Exception, argv: list[str]) -> str:
    message = str(error)
    if isinstance(error, AttributeError) and "has no attribute 'get_config'" in message:
        return (f'--config={_config_file(argv)} has no get_config(); a config file defines '
                'get_config() returning an ml_collections.ConfigDict.')
    missing = re.fullmatch(
        r'flag --(\S+)=None: Flag --\S+ must have a value other than None\.', message
    )
    if missing:
        name = missing.group(1)
        required = f'--{name} is required ({flags.FLAGS[name].help.rstrip(".")}).'
        return _config_returned_none(argv) or required
    unknown = re.fullmatch(r"Unknown command line flag '([^']+)'.*", message, re.DOTALL)
    if unknown:
        return f'unknown flag --{unknown.group(1)}; --helpfull lists the flags.'
    if isinstance(error, (KeyError, AttributeError)):  # ml_collections: no such config key
        key = re.search(r"'(?:\\')?([\w-]+)", message)  # "'key'" or "'\\'key\\'\\n..."
        hint = re.search(r'Did you mean "([^"]+)"', message)
        name = _override_naming(key.group(1), argv) if key else message
        return (
            f'{name} is not a key of the config'
            f'{f" (did you mean {hint.group(1)}?)" if hint else ""}; the config file lists '
            'its keys.'
        )
    if isinstance(error, flags.Error):
        return message
    return f'the config file could not be loaded: {type(error).__name__}: {message}'


def _config_returned_none(argv: list[str]) -> str | None:
    """The error of a config file whose ``get_config()`` returned None (ml_collections only
    warns, and the run would then fail on a missing ``--config``)."""
    config_file = _config_file(argv)
    if config_file is None or 'config' not in flags.FLAGS or flags.FLAGS['config'].value:
        return None
    return (f'--config={config_file}: its get_config() returned None; it must return an '
            'ml_collections.ConfigDict (a missing return statement?).')


def _config_file(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config=F`` or ``--config F``)."""
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            return arg.partition('=')[2]
        if arg == '--config' and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _override_naming(key: str, argv: list[str]) -> str:
    """The ``--config.a.b`` override in ``argv`` whose path holds ``key`` (else ``key``)."""
    for arg in argv:
        name = arg.split('=')[0]
        if name.startswith('--') and key in name.split('.')[1:]:
            return name
    return key
