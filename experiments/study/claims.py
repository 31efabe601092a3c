"""Cells claimed by one of several processes that share a grid's workdir (``--claim``).

``--shard i/n`` fixes each process's cells in advance, so processes whose cells cost
differently (a two-pass SAM cell takes about twice an SGD one) finish hours apart. With
``--claim`` every process walks the grid's cells in order and trains a cell only if it
claims it first: it creates ``WORKDIR/.claims/<cell>`` (``os.mkdir`` either creates the folder
or fails, for exactly one of the processes that try), writes its host and pid there, and
removes the claim when it leaves the cell, finished or not (the cell's ``summary.json`` says
which). A process that finds a cell claimed goes on to the next, so the processes stay busy
until the last cell is taken.

A claim whose owner was killed without a chance to remove it (``SIGKILL``, a crash of the
machine) is stale. One made on this host by a pid that no longer exists is taken over; one made
on another host cannot be checked from here and stays until it is removed by hand (the log
line names the folder).
"""

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator

from experiments.runtime import files

CLAIMS_DIR = '.claims'
OWNER_FILE = 'owner.json'


def _owner(path: str) -> dict:
    """Who holds the claim at ``path``: ``{}`` while its owner has yet to write it."""
    return files.read_json(os.path.join(path, OWNER_FILE)) or {}


def _is_stale(owner: dict) -> bool:
    """Whether ``owner`` is a process of this host that is gone (another host's: never)."""
    if owner.get('host') != socket.gethostname() or not isinstance(owner.get('pid'), int):
        return False
    try:
        os.kill(owner['pid'], 0)  # signal 0: only asks whether the pid exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, owned by another user
        pass
    return False


def _take(path: str) -> dict | None:
    """Claims ``path``; returns ``None`` on success, else the live owner holding it."""
    for _ in range(2):  # a second try after moving a stale claim aside
        try:
            os.mkdir(path)
        except FileExistsError:
            owner = _owner(path)
            if not _is_stale(owner):
                return owner
            aside = f'{path}.stale-{os.getpid()}'
            try:
                os.rename(path, aside)  # one process wins; the others see it gone and retry
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
            continue
        files.write_json(os.path.join(path, OWNER_FILE),
                         {'host': socket.gethostname(), 'pid': os.getpid()})
        return None
    return _owner(path)


def who(owner: dict) -> str:
    """``owner`` in words: ``pid 123 on host``, or a process yet to write it."""
    if not owner:
        return 'a process starting it'
    return f'pid {owner.get("pid", "?")} on {owner.get("host", "?")}'


def describe(workdir: str, name: str, owner: dict) -> str:
    """One line on a cell claimed by ``owner``, naming the folder to remove if it is stale."""
    path = os.path.join(workdir, CLAIMS_DIR, name)
    return f'{name}: claimed by {who(owner)}, skipped (if that process is gone, remove {path})'


@contextlib.contextmanager
def claim(workdir: str, name: str) -> Iterator[dict | None]:
    """Claims cell ``name`` of ``workdir`` for the ``with`` block.

    Yields ``None`` when this process holds the claim (released on leaving the block, also
    through an exception), or the owner (``{'host', 'pid'}``, ``{}`` if it has yet to write
    them) of another live process's claim, which is left alone.
    """
    path = os.path.join(workdir, CLAIMS_DIR, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    owner = _take(path)
    if owner is not None:
        yield owner
        return
    try:
        yield None
    finally:
        shutil.rmtree(path, ignore_errors=True)


def held(workdir: str) -> dict[str, dict]:
    """The claims in ``workdir`` now: cell name -> owner."""
    root = os.path.join(workdir, CLAIMS_DIR)
    if not os.path.isdir(root):
        return {}
    return {name: _owner(os.path.join(root, name)) for name in sorted(os.listdir(root))
            if '.stale-' not in name}
