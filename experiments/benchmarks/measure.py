"""Measuring on a shared machine: compilations, interleaved rounds, memory, the machine.

Timing rules (the machine is shared and noisy): every variant runs in the same process; the
warm-up (which compiles) is excluded; the variants take turns round by round, in a rotated
order; each round ends with ``block_until_ready``; and results are medians over rounds, with
ratios taken within a round before the median.
"""

import collections
import contextlib
import os
import platform
import re
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import numpy as np
import optax

# Emitted by jax once per XLA compilation, with the jitted function's name.
_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


class CompileCounter(contextlib.AbstractContextManager):
    """Counts XLA compilations of functions whose name contains ``name`` (jax.monitoring)."""

    def __init__(self, name: str = 'train_step'):
        self.name, self.count = name, 0

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        del duration
        if event == _COMPILE_EVENT and self.name in str(kwargs.get('fun_name', '')):
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc_info):
        jax.monitoring.unregister_event_duration_listener(self._listener)
        return None


def interleaved_rounds(runners: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list]:
    """Seconds per round of each runner; runners take turns, the order rotating each round."""
    names = list(runners)
    times = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: Sequence[float], reference: Sequence[float]) -> float:
    """Median over rounds of the within-round ratio ``times[r] / reference[r]``."""
    return float(np.median(np.asarray(times) / np.asarray(reference)))


def peak_rss_bytes() -> int:
    """The process's peak resident set size (ru_maxrss): process-wide and monotone."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == 'darwin' else peak * 1024  # Linux reports KiB


def machine_description() -> dict[str, str]:
    """CPU, cores, memory, load and library versions, for the benchmark's header."""
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        import psutil

        memory = f'{psutil.virtual_memory().total / 2**30:.1f} GiB'
    except ImportError:  # psutil is an experiments dependency; tolerate its absence
        memory = 'unknown'
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    device = jax.devices()[0]
    return {
        'cpu': f'{cpu}, {cores} cores usable ({os.cpu_count()} online)',
        'memory': memory,
        'device': f'{jax.default_backend()}: {getattr(device, "device_kind", device)}',
        'versions': (
            f'python {platform.python_version()}, jax {jax.__version__}, '
            f'flax {flax.__version__}, optax {optax.__version__}'
        ),
        'os': platform.platform(),
    }


def load_average() -> str:
    return ', '.join(f'{x:.2f}' for x in os.getloadavg())


# XLA:CPU runs a convolution on its fast (Eigen) path only in this form: NHWC input, HWIO
# kernel, NHWC output.
CANONICAL_CONV = 'b01f_01io->b01f'


def conv_dim_labels(hlo_text: str) -> dict[str, collections.Counter]:
    """Counts the ``dim_labels`` of the convolutions in an optimised HLO module's text,
    split into those in control flow (branches of a ``conditional``, bodies of a ``while``:
    ``'control_flow'``) and the rest (``'straight'``). The profile of ``every_k``'s slow
    path on CPU: convolutions that keep a non-canonical form there."""
    flow = set(re.findall(r'branch_computations=\{([^}]*)\}', hlo_text))
    flow = {n.strip().lstrip('%') for group in flow for n in group.split(',')}
    flow |= set(re.findall(r'body=%?([\w.-]+)', hlo_text))
    counts = {'control_flow': collections.Counter(), 'straight': collections.Counter()}
    computation = ''
    for line in hlo_text.splitlines():
        header = re.match(r'(?:ENTRY )?%?([\w.-]+) ', line)
        if header and not line[0].isspace() and line.rstrip().endswith('{'):
            computation = header.group(1)
        if ' convolution(' in line:
            match = re.search(r'dim_labels=([\w>-]+)', line)
            where = 'control_flow' if computation in flow else 'straight'
            counts[where][match.group(1) if match else '?'] += 1
    return counts
