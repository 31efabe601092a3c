"""The task interface: what the runtime needs of a task (image classification, translation...).

A task is one folder (``experiments/<task>/``) whose ``TASK`` implements :class:`Task`. The
runtime (``runtime/loop.py``) owns everything task-free: the config check of its own keys and
of the optimiser, the workdir, the mesh, the schedule and the optax chain, the jitted step
with its non-finite guard, the log / evaluate / checkpoint cadence, preemption, metrics and the
summary. The task owns its data, its model, its state, its train and eval steps and its
metrics; nothing in the runtime names images, labels or tokens.

A new task needs:

- ``Task.default_config()``: its defaults, every key (a workdir older than a key ran at its
  default); ``Task.check_config(config)``: its own keys, raising ``errors.ConfigError``.
- ``Task.load(config, mesh, num_shards) -> TaskRun``: read this process's data and place it on
  the mesh. The run then builds the state (any pytree with ``step`` and ``params`` fields and a
  ``replace`` or ``_replace``: a Flax ``struct``, a NamedTuple; an NNX model enters as
  ``nnx.split`` state), the train step and the evaluation.

The train step is ``train_step(state, metrics, *inputs) -> (state, metrics)``, pure and not
jitted: the runtime wraps and jits it once, with ``inputs = run.train_inputs(step)`` sharded as
``run.input_shardings``. ``metrics`` is a dict of on-device float32 sums that holds ``loss``
(and ``grad_norm`` when the task has one: both are checked for non-finite values); the host
reads it once per log interval through ``run.summarize_train``. ``run.evaluate(state)`` returns
host floats (accuracy, or BLEU for a translation task, whatever it computes).
"""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import ml_collections
import optax
from jax.sharding import Mesh

from experiments.runtime import config_check, loop


class TaskRun(Protocol):
    """One run of a task: its data loaded, ready to build the state and the steps.

    Attributes:
      epoch_steps: steps in one pass over the training data (for ``num_epochs`` and the
        ``epoch`` of the records).
      examples_per_step: examples in one training batch (for the throughput).
      throughput_key: the name of the throughput in the records (``'images_per_sec'``).
      eval_name: the evaluated split (``'test'``, ``'validation'``), for the progress bar.
      headline: the record key shown on the progress bar after an evaluation.
      input_shardings: shardings of ``train_inputs(step)``, in order.
    """

    epoch_steps: int
    examples_per_step: int
    throughput_key: str
    eval_name: str
    headline: str
    input_shardings: tuple

    def init_state(self, tx: optax.GradientTransformation) -> Any:
        """The initial state (step 0), on the host or any device."""

    def make_train_step(self, tx: optax.GradientTransformationExtraArgs,
                        state: Any) -> Callable:
        """``train_step(state, metrics, *inputs) -> (state, metrics)``, not jitted."""

    def zero_metrics(self) -> dict:
        """A fresh accumulator of on-device sums (after :meth:`make_train_step`)."""

    def train_inputs(self, step: int) -> tuple:
        """The inputs of the train step at ``step`` (e.g. on-device data and its order)."""

    def summarize_train(self, sums: dict) -> dict[str, float]:
        """Host-side means of a fetched accumulator, e.g. ``train_loss``."""

    def evaluate(self, state: Any) -> dict[str, float]:
        """The evaluation metrics of ``state`` as host floats."""

    def progress(self, record: dict) -> dict[str, str]:
        """What the progress bar shows of a training record."""

    def save_artifacts(self, workdir: str) -> None:
        """Files the task writes once per run on the main process (e.g. a noise audit)."""

    def summary(self, config: ml_collections.ConfigDict, history: list[dict]) -> dict:
        """The task's keys of ``summary.json`` from the metrics history."""


class Task(Protocol):
    """A task: its config keys and how to load a run of it."""

    name: str

    def default_config(self) -> ml_collections.ConfigDict:
        """Every key of the task's configs, at its default."""

    def check_config(self, config: ml_collections.ConfigDict) -> None:
        """Raises ``errors.ConfigError`` (one line naming the key) for a bad task key."""

    def load(self, config: ml_collections.ConfigDict, mesh: Mesh, num_shards: int) -> TaskRun:
        """Reads this process's ``num_shards / mesh.size`` data shards per device."""


@dataclasses.dataclass(frozen=True)
class Definition:
    """A :class:`Task` from its name and three functions: what a task folder's ``TASK`` is.

    ``validate_config`` and ``train_and_evaluate`` are the runtime's whole check and its run
    loop bound to this task; a task module exports them under the same names.

    Attributes:
      name: the task's folder, the value of ``config.task`` that selects it.
      default_config: ``() -> ConfigDict``, every key at its default.
      check_config: ``(config) -> None``, raises ``errors.ConfigError`` for a bad task key.
      load: ``(config, mesh, num_shards) -> TaskRun``, e.g. the run's class.
    """

    name: str
    default_config: Callable[[], ml_collections.ConfigDict]
    check_config: Callable[[ml_collections.ConfigDict], None]
    load: Callable[[ml_collections.ConfigDict, Mesh, int], TaskRun]

    def validate_config(self, config: ml_collections.ConfigDict) -> None:
        """The whole config check of a run (runtime keys, task keys, optimiser)."""
        config_check.check(self, config)

    def train_and_evaluate(self, config: ml_collections.ConfigDict, workdir: str,
                           **kwargs) -> dict:
        """``loop.train_and_evaluate`` on this task (``stop_at_step``, ``allow_config_change``
        as there)."""
        return loop.train_and_evaluate(self, config, workdir, **kwargs)
