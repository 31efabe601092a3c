"""Files of a workdir: atomic writes and tolerant JSON reads (the one helper for each)."""

import contextlib
import json
import os
import tempfile


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to a temporary file next to ``path``, then renames it onto ``path``.

    A crash leaves the old file or the new one, never a part; the temporary file has a unique
    name, so two writers never share it.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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
