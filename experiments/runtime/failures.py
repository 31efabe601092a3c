"""Failures of the machine during a run: one line for the user, the traceback in error.log.

A write the machine refuses (no space left, the file-size limit, a read-only or unwritable
folder) surfaces as an ``OSError`` from Python's own writes, or as another exception whose
message carries the OS error code (orbax writes through TensorStore, in background threads;
their errors reach the run at the next save or at ``wait_until_finished``).
:func:`reported` maps both to :class:`errors.EnvironmentFailure` (exit code 4) with one line
that names the fix, and writes the full traceback to ``WORKDIR/error.log``. Orbax's own error
logs of such a failure (a traceback per background thread) go to that file too, not to the
terminal; asyncio's "Event loop is closed" reports, left behind when a damaged checkpoint is
read (orbax's reads outlive the event loop they were started on), are dropped.
"""

import contextlib
import errno
import logging
import os
import re
import sys
import traceback

from experiments.runtime import errors

ERROR_LOG = 'error.log'
# The OS errors a run cannot fix itself, each with what the user can do about it.
FIXES = {
    errno.ENOSPC: 'free some space',
    errno.EDQUOT: 'free some space or raise the disk quota',
    errno.EFBIG: 'raise the file-size limit (ulimit -f)',
    errno.EROFS: 'make it writable',
    errno.EACCES: 'make it writable',
    errno.EPERM: 'make it writable',
    errno.ENAMETOOLONG: 'pass a shorter --workdir',
    errno.EIO: 'check the disk',
}
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def os_errno(error: BaseException) -> int | None:
    """The OS error number of :data:`FIXES` behind ``error`` (or its causes), else None."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in FIXES:
            return e.errno
        match = _TENSORSTORE_ERRNO.search(str(e))
        if match and int(match.group(1)) in FIXES:
            return int(match.group(1))
    return None


def _failed_path(error: BaseException, default: str) -> str:
    for e in _chain(error):
        if isinstance(e, OSError) and e.filename:
            return os.fsdecode(e.filename)
        match = _QUOTED_PATH.search(str(e))
        if match:
            return match.group(1)
    return default


def describe(error: BaseException, workdir: str, log_path: str | None) -> str:
    """The one line of an environment failure: what failed, where, the fix, the log."""
    code = os_errno(error)
    path = _failed_path(error, workdir)
    if len(path) > 200:  # one line: a path past any useful length is cut in the middle
        path = f'{path[:100]}...{path[-97:]}'
    log = (f'the traceback is in {log_path}' if log_path else
           'no error.log: the workdir cannot be written')
    return (f'Cannot write {path}: {os.strerror(code)} ({errno.errorcode[code]}); '
            f'{FIXES[code]}, then rerun the same command to resume from the last complete '
            f'checkpoint ({log}).')


def _write_log(workdir: str, error: BaseException, held: list[logging.LogRecord]) -> str | None:
    path = os.path.join(workdir, ERROR_LOG)
    formatter = logging.Formatter('%(levelname)s %(pathname)s:%(lineno)d] %(message)s')
    text = ''.join(traceback.format_exception(error))
    text += ''.join(f'\nLogged during the failure:\n{formatter.format(r)}\n' for r in held)
    try:
        with open(path, 'a') as f:
            f.write(text)
    except OSError:
        return None
    return path


class _HoldOrbaxErrors(logging.Filter):
    """Holds back orbax's error logs (one traceback per background thread of a failed save)."""

    def __init__(self):
        super().__init__()
        self.held = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in record.pathname:
            self.held.append(record)
            return False
        return True


def _loop_is_closed(exc_info) -> bool:
    error = exc_info[1] if exc_info else None
    return isinstance(error, RuntimeError) and str(error) == 'Event loop is closed'


class _DropClosedLoop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _loop_is_closed(record.exc_info)


@contextlib.contextmanager
def quiet_closed_event_loops():
    """Drops "Event loop is closed" reports (unraisable exceptions and asyncio's callback
    errors) while the block runs; every other report passes through."""
    previous_hook = sys.unraisablehook

    def hook(unraisable):
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == 'Event loop is closed'):
            previous_hook(unraisable)

    asyncio_filter = _DropClosedLoop()
    sys.unraisablehook = hook
    logging.getLogger('asyncio').addFilter(asyncio_filter)
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        logging.getLogger('asyncio').removeFilter(asyncio_filter)


@contextlib.contextmanager
def reported(workdir: str):
    """Turns a write the machine refuses into :class:`errors.EnvironmentFailure`.

    The traceback (and orbax's error logs of it) go to ``WORKDIR/error.log``; the exception
    raised has one line naming the failed path, the OS error and the fix. Other exceptions
    pass unchanged (orbax's held logs are then logged as usual).
    """
    holder = _HoldOrbaxErrors()
    absl_logger = logging.getLogger('absl')
    absl_logger.addFilter(holder)
    try:
        with quiet_closed_event_loops():
            yield
    except Exception as e:
        code = os_errno(e)
        if code is None:
            raise
        absl_logger.removeFilter(holder)
        log_path = _write_log(workdir, e, holder.held)
        holder.held = []
        raise errors.EnvironmentFailure(describe(e, workdir, log_path), code) from e
    finally:
        absl_logger.removeFilter(holder)
        for record in holder.held:
            absl_logger.handle(record)

