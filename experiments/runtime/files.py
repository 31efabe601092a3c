"""Files of a workdir: atomic writes and tolerant JSON reads (the one helper for each)."""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path next to ``path``; renames it onto ``path`` when the block ends.

    Whatever the block writes there (a copy, a figure) appears at ``path`` whole or not at
    all: a crash or an exception leaves the old file, and the temporary one is removed. Its
    name is unique, so two processes writing the same ``path`` never share it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through :func:`atomic_path`, synced to disk first."""
    with atomic_path(path) as tmp, open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str, value) -> str:
    """Writes ``value`` as indented, key-sorted JSON, atomically; returns ``path``."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + '\n')
    return path


def read_json(path: str):
    """The JSON value in ``path``, or None when the file does not exist.

    Raises:
      OSError, ValueError: the file exists but cannot be read or parsed.
    """
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
