"""JAX's distributed runtime and the data-parallel mesh of the trainer.

One process per host, as JAX expects: ``jax.distributed.initialize`` connects them (with the
coordinator given by flags, or detected on TPU pods, SLURM, Open MPI and Kubernetes), and
``jax.devices()`` then lists every device of every process. The trainer shards the batch over
a one-axis mesh of all of them and replicates the parameters; under ``jax.jit`` XLA inserts
the gradient all-reduce, and BatchNorm normalises with statistics of the *global* batch.
"""

import socket
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments.runtime import errors

DATA_AXIS = 'data'


class DistributedError(errors.BadInputError, RuntimeError):
    """The distributed runtime could not start; the message is one line and names the fix."""


def _cluster_detected() -> bool:
    """Whether JAX would find a cluster by itself (TPU pod, SLURM, MPI, Kubernetes)."""
    try:
        from jax._src import clusters  # no public API tells this without initialising
    except ImportError:
        return False
    kinds = getattr(clusters.ClusterEnv, '_cluster_types', ())
    detected = []
    for kind in kinds:
        try:
            detected.append(bool(kind.is_env_present()))
        except Exception:  # a probe that cannot run means: not this cluster
            detected.append(False)
    return any(detected)


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit():
        raise DistributedError(
            f'--coordinator_address={address!r} is not HOST:PORT, e.g. 10.0.0.1:1234.')
    try:
        socket.getaddrinfo(host, int(port))
    except socket.gaierror as e:
        raise DistributedError(
            f'--coordinator_address host {host!r} does not resolve ({e.strerror}); '
            'pass the address of process 0.') from e


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Polls the coordinator's port: jaxlib aborts the process (no exception) on a timeout."""
    host, _, port = address.rpartition(':')
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f'Could not join the distributed run at {address} within {timeout_s}s '
                    f'({e.strerror or e}); check that process 0 runs and that the address and '
                    'port are reachable.') from e
            time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> None:
    """Starts JAX's distributed runtime when the run spans several processes.

    With ``coordinator_address`` (and ``num_processes``, ``process_id``) the processes meet
    there; without it, JAX's own cluster detection is used where a cluster is present, and a
    single-process run initialises nothing. On CPU, collectives go through gloo, so a
    multi-process rehearsal works on one machine over loopback.

    Raises:
      DistributedError: bad flags, or the coordinator did not answer within ``timeout_s``.
    """
    explicit = coordinator_address is not None or num_processes not in (None, 1)
    if not explicit and not _cluster_detected():
        return
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise DistributedError('Pass all of --coordinator_address, --num_processes and '
                                   '--process_id (or none, where JAX detects the cluster).')
        if not 0 <= process_id < num_processes:
            raise DistributedError(f'--process_id={process_id} must be in [0, {num_processes}).')
        _check_address(coordinator_address)
        if process_id != 0:  # process 0 starts the coordinator itself
            _wait_for_coordinator(coordinator_address, timeout_s)
    # gloo is the CPU cross-process collective implementation (a no-op on GPU/TPU).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # jaxlib raises XlaRuntimeError/RuntimeError/ValueError here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f'Could not join the distributed run at {coordinator_address or "(detected)"} '
            f'within {timeout_s}s ({first[:200]}); check that process 0 runs and that the '
            'address and port are reachable.') from e


def make_mesh() -> Mesh:
    """A one-axis mesh over all devices of all processes, in process order."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the devices."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def put(tree, sharding: NamedSharding):
    """Places a pytree of host (or single-device) values that every process holds alike.

    Each process materialises only the pieces its own devices hold, so a sharded split
    costs a process just its devices' share of device memory.
    """
    def place(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def local_shards(mesh: Mesh, num_shards: int | None = None) -> np.ndarray:
    """The data shards this process's devices hold, ascending.

    ``num_shards`` (default: one per device; a multiple of ``mesh.size``) are split over the
    devices in mesh order, ``num_shards / mesh.size`` consecutive shards each. :func:`make_mesh`
    orders devices by process, so a process's shards are contiguous.
    """
    per_device = (num_shards or mesh.size) // mesh.size
    positions = np.flatnonzero([d.process_index == jax.process_index() for d in mesh.devices.flat])
    return (positions[:, None] * per_device + np.arange(per_device)).reshape(-1)


def put_shards(tree, mesh: Mesh):
    """Global arrays sharded over ``mesh`` from this process's rows of their leading axis.

    Each leaf holds, along axis 0, the shards of this process's devices (in the order of
    :func:`local_shards`); the global leading axis has the shards of every process.
    """
    sharding = sharded(mesh)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def place(x):
        local = np.asarray(x)
        global_shape = (local.shape[0] * mesh.size // local_devices, *local.shape[1:])
        return jax.make_array_from_process_local_data(sharding, local, global_shape)

    return jax.tree.map(place, tree)


def combine_across_processes(x: np.ndarray, op: Callable = np.sum) -> np.ndarray:
    """``op`` over axis 0 of this host array gathered from every process (same shape on all).

    One process: ``op`` over a single entry, i.e. ``x`` itself for sum or max.
    """
    gathered = multihost_utils.process_allgather(np.asarray(x), tiled=False)
    return op(np.asarray(gathered).reshape(-1, *np.shape(x)), axis=0)


_MESSAGE_CHARS = 2000


def raise_on_every_process(error: Exception | None) -> None:
    """Raises on every process the error that process 0 hit; ``None``: it hit none.

    A run that process 0 refuses (say its workdir is locked by another run) must stop on every
    process with the same one line and exit code, not leave the others waiting at their first
    collective until the distributed timeout. Process 0 raises ``error`` itself; the others
    raise an error of the same kind (:class:`errors.BadInputError` or
    :class:`errors.EnvironmentFailure`, so the same exit code) with its message. With one
    process this raises ``error``, if any, and communicates nothing.

    Args:
      error: what process 0 hit (ignored on the other processes), one of the two kinds above.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    # [kind, errno, message as one code point per entry]: 0 none, 1 bad input, 2 environment.
    shared = np.zeros(2 + _MESSAGE_CHARS, np.int32)
    if is_main_process() and error is not None:
        environment = isinstance(error, errors.EnvironmentFailure)
        text = np.array([ord(c) for c in str(error)[:_MESSAGE_CHARS]], np.int32)
        shared[:2] = (2, error.errno) if environment else (1, 0)
        shared[2:2 + len(text)] = text
    shared = np.asarray(multihost_utils.broadcast_one_to_all(shared))
    if is_main_process() and error is not None:
        raise error
    kind, errno = int(shared[0]), int(shared[1])
    message = ''.join(map(chr, np.trim_zeros(shared[2:], 'b')))
    if kind == 1:
        raise errors.BadInputError(message)
    if kind == 2:
        raise errors.EnvironmentFailure(message, errno)


def is_main_process() -> bool:
    return jax.process_index() == 0
