"""The variants every benchmark times, built with the trainer's own step.

A *variant* is one optimiser (SGD, ``vasso_jax``'s SAM / VaSSO / ASAM, ``optax.contrib.sam``,
VaSSO with ``every_k``) plugged into
:func:`experiments.image_classification.steps.make_train_step`, the code the CLI runs, and
jitted with its state donated, as :mod:`experiments.runtime.loop` does. All variants of
one model share the model, the initial weights, the synthetic CIFAR-shaped batch and the base
optimiser (weight decay + SGD with momentum, from
:func:`experiments.runtime.optimizers.make_optimizer`).

How they are timed is :mod:`experiments.benchmarks.measure`'s business.
"""

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.configs import default
from experiments.image_classification import models, steps
from experiments.image_classification.data import augment as augment_lib
from experiments.runtime import optimizers

# CIFAR-10's per-channel statistics: the synthetic images are normalised as CIFAR's would be.
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
CONTRIB_SAM = 'optax.contrib.sam'
# Halves CPU compile times; for runs that check the code rather than time it (--tiny).
FAST_COMPILE = {'xla_backend_optimization_level': 0}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to benchmark: a label for tables and ``models.get_model`` arguments."""

    label: str
    name: str
    kwargs: dict = dataclasses.field(default_factory=dict)

    def build(self, num_classes: int, **overrides):
        return models.get_model(self.name, num_classes, **{**self.kwargs, **overrides})


# The model of the --tiny runs, which check the code, not speed: a small convolutional network
# (convolutions, BatchNorm) that compiles in a few seconds on CPU.
TINY = ModelSpec('CNN (tiny, 8x8 images)', 'cnn', {'width': 4, 'hidden': 32})


def bench_config(
    optimizer: str, *, every_k: int = 1, batch_size: int = 64, recipe: str = 'cifar', **overrides
):
    """The default (CIFAR, paper) config with ``optimizer``, ``every_k`` and ``overrides`` set.

    ``recipe='tiny'`` shrinks the augmentation to fit 8x8 test images.
    """
    config = default.get_config()
    config.optimizer = optimizer
    config.every_k = every_k
    config.batch_size = batch_size
    config.update(overrides)
    if recipe == 'tiny':
        config.crop_padding, config.cutout_size = 1, 4
    return config


def contrib_sam(base: optax.GradientTransformation, rho: float):
    """``optax.contrib.sam`` in opaque mode, with our ``grad_fn(p)`` calling convention.

    Opaque mode runs the ascent and the second gradient inside one ``update``, like our
    link; its ``grad_fn`` takes ``(params, adversarial_step)``, so this adapter drops the
    step. The adversary is the SAM paper's (normalised gradient, step ``rho``); the outer
    optimiser is ``base``, the same chain our variants end with.
    """
    inner = optax.contrib.sam(
        base,
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )

    def update_fn(updates, state, params=None, *, grad_fn, **extra_args):
        del extra_args
        return inner.update(updates, state, params, grad_fn=lambda p, _: grad_fn(p))

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def make_tx(variant: str, schedule: optax.Schedule, *, every_k: int = 1, **overrides):
    """The optax chain of ``variant``: a trainer optimiser name or :data:`CONTRIB_SAM`."""
    if variant == CONTRIB_SAM:
        config = bench_config('sgd', **overrides)
        return contrib_sam(optimizers.make_optimizer(config, schedule), config.rho)
    return optimizers.make_optimizer(bench_config(variant, every_k=every_k, **overrides), schedule)


def synthetic_split(
    num_examples: int, image_shape: Sequence[int], num_classes: int, seed: int = 0
) -> steps.Split:
    """Random uint8 images and labels (no download) as one shard, on the default device."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
    return jax.device_put(steps.shard_split(images, labels, labels, num_shards=1))


def make_augment_fn(recipe: str = 'cifar') -> Callable:
    """The CIFAR recipe's augmentation (crop 4, flip, Cutout 16 at p = 0.5)."""
    return augment_lib.from_config(bench_config('sgd', recipe=recipe), mean=CIFAR_MEAN,
                                   std=CIFAR_STD)


def tree_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Variant:
    """One optimiser's jitted train step and its (donated, so rebound) state and metrics.

    With ``plain_tx``, the variant is ``every_k`` by *host dispatch*: two executables, the
    host running ``tx``'s step on every ``every_k``-th step and ``plain_tx``'s (the same
    chain with rho = 0: same state, no second pass) otherwise.
    """

    def __init__(
        self,
        name: str,
        tx,
        model,
        params,
        batch_stats,
        *,
        data: steps.Split,
        perm,
        num_classes: int,
        batch_size: int,
        epoch_steps: int,
        augment_fn: Callable,
        rng,
        every_k: int = 1,
        plain_tx=None,
        compiler_options: dict | None = None,
    ):
        self.name, self.tx, self.every_k = name, tx, every_k
        self.compiler_options = compiler_options
        copy = lambda tree: jax.tree.map(jnp.copy, tree)
        params = copy(params)
        self.state = steps.TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=copy(batch_stats),
            opt_state=jax.jit(tx.init)(params),
            rng=jnp.copy(rng),
        )
        diagnostics = optimizers.link_diagnostics(self.state.opt_state)
        self.metrics = steps.zero_metrics(diagnostics)
        step_kwargs = dict(
            num_classes=num_classes,
            batch_size=batch_size,
            epoch_steps=epoch_steps,
            diagnostics=diagnostics,
            one_pass=optimizers.holds_one_pass(self.state.opt_state),
        )
        self.step_fns = [
            jax.jit(
                steps.make_train_step(model, t, augment_fn, **step_kwargs),
                donate_argnums=(0, 1),
                compiler_options=compiler_options,
            )
            for t in ([tx] if plain_tx is None else [tx, plain_tx])
        ]
        self.data, self.perm = data, perm
        self.params_bytes = tree_bytes(params)
        self.opt_state_bytes = tree_bytes(self.state.opt_state)
        self.compilations = 0  # XLA compilations seen while this variant's steps ran
        self.steps_run = 0

    def is_sharp(self, step: int) -> bool:
        """Whether ``step`` (counted from 0) takes the two-pass gradient."""
        return step % self.every_k == 0

    def _step(self, counter):
        fn = self.step_fns[0]
        if len(self.step_fns) > 1 and not self.is_sharp(self.steps_run):
            fn = self.step_fns[1]
        before = counter.count if counter else 0
        self.state, self.metrics = fn(self.state, self.metrics, self.data, self.perm)
        self.steps_run += 1
        if counter:
            self.compilations += counter.count - before

    def run(self, num_steps: int, counter=None) -> None:
        """``num_steps`` steps, then waits for the device."""
        for _ in range(num_steps):
            self._step(counter)
        jax.block_until_ready((self.state, self.metrics))

    def run_each(self, num_steps: int, counter=None) -> list:
        """``num_steps`` steps, each waited for: ``[(two_pass, seconds), ...]``."""
        out = []
        for _ in range(num_steps):
            sharp = self.is_sharp(self.steps_run)
            start = time.perf_counter()
            self._step(counter)
            jax.block_until_ready((self.state, self.metrics))
            out.append((sharp, time.perf_counter() - start))
        return out

    def optimizer_runner(self, calls: int) -> Callable:
        """A runner of ``calls`` optimiser updates alone: the whole chain with a ``grad_fn``
        that costs one multiply-add instead of a backward pass. It isolates what the
        optimiser adds to a step (ascent, norms, direction, base optimiser)."""
        tx = self.tx
        params = jax.tree.map(jnp.copy, self.state.params)
        opt_state = jax.tree.map(jnp.copy, self.state.opt_state)
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)

        @functools.partial(jax.jit, donate_argnums=(0, 1), compiler_options=self.compiler_options)
        def update(params, opt_state, grads):
            grad_fn = lambda p: jax.tree.map(lambda w, g: 0.5 * w + g, p, grads)
            updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), opt_state

        carry = [params, opt_state]
        carry[:] = update(*carry, grads)  # compile outside the timed rounds
        jax.block_until_ready(carry)

        def run():
            for _ in range(calls):
                carry[:] = update(*carry, grads)
            jax.block_until_ready(carry)

        return run

    def cache_size(self) -> int | None:
        """Entries in the jitted steps' caches (one per traced signature), if jax exposes
        them (a private method: checked, not relied on)."""
        sizes = [getattr(fn, '_cache_size', None) for fn in self.step_fns]
        return sum(size() for size in sizes) if all(map(callable, sizes)) else None

    def compiled(self, index: int = 0):
        """The compiled executable of step function ``index`` (a cache hit once it ran)."""
        fn = self.step_fns[index]
        return fn.lower(self.state, self.metrics, self.data, self.perm).compile()


def variant_name(optimizer: str, every_k: int = 1, dispatch: str = 'cond') -> str:
    if every_k == 1:
        return optimizer
    how = 'lax.cond' if dispatch == 'cond' else 'host dispatch'
    return f'{optimizer} k={every_k} ({how})'


def build_variants(
    spec: ModelSpec,
    names: Sequence[tuple],
    *,
    batch_size: int,
    image_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
    epoch_steps: int = 8,
    recipe: str = 'cifar',
    total_steps: int = 1000,
    model_overrides: dict | None = None,
    seed: int = 0,
    compiler_options: dict | None = None,
) -> list[Variant]:
    """Builds variants of one model on shared initial weights and data.

    Each name is ``(optimizer, every_k)`` or ``(optimizer, every_k, dispatch)``, with
    dispatch ``'cond'`` (the library's ``every_k``: one executable, ``lax.cond``) or
    ``'host'`` (two executables; see :class:`Variant`). The model is initialised once (with
    :func:`steps.create_train_state`); each variant gets its own copy of the weights,
    since its step donates them. ``compiler_options`` go to every ``jax.jit`` (e.g.
    :data:`FAST_COMPILE` for tests, where speed is not measured).
    """
    model = spec.build(num_classes, **(model_overrides or {}))
    config = bench_config('sgd', batch_size=batch_size)
    schedule = optimizers.make_schedule(config, total_steps, epoch_steps)
    init_key, data_key, augment_key = steps.split_keys(seed)
    first = steps.create_train_state(
        model,
        make_tx('sgd', schedule),
        image_shape=image_shape,
        init_key=init_key,
        augment_key=augment_key,
    )
    data = synthetic_split(batch_size * epoch_steps, image_shape, num_classes, seed)
    perm = steps.epoch_permutation(data_key, 0, 1, batch_size * epoch_steps)
    common = dict(
        data=data,
        perm=perm,
        num_classes=num_classes,
        batch_size=batch_size,
        epoch_steps=epoch_steps,
        augment_fn=make_augment_fn(recipe),
        rng=augment_key,
        compiler_options=compiler_options,
    )
    variants = []
    for optimizer, every_k, *dispatch in names:
        dispatch = dispatch[0] if dispatch else 'cond'
        name = variant_name(optimizer, every_k, dispatch)
        if dispatch == 'host':  # the trainer's two chains (every_k = 1 and rho = 0)
            tx, plain = optimizers.make_optimizers(
                bench_config(optimizer, every_k=every_k, batch_size=batch_size), schedule)
            variant = Variant(
                name,
                tx,
                model,
                first.params,
                first.batch_stats,
                every_k=every_k,
                plain_tx=plain,
                **common,
            )
        else:
            tx = make_tx(optimizer, schedule, every_k=every_k)
            variant = Variant(
                name, tx, model, first.params, first.batch_stats, every_k=every_k, **common
            )
        variants.append(variant)
    return variants


def make_augment_runner(
    batch: jax.Array, calls: int, recipe: str = 'cifar', compiler_options: dict | None = None
) -> Callable:
    """A runner of ``calls`` jitted augmentations of ``batch`` (fresh key each call)."""
    augment_fn = make_augment_fn(recipe)
    fn = jax.jit(
        lambda key, i, images: augment_fn(jax.random.fold_in(key, i), images),
        compiler_options=compiler_options,
    )
    key = jax.random.PRNGKey(0)
    jax.block_until_ready(fn(key, 0, batch))  # compile outside the timed rounds
    counter = iter(range(10**9))

    def run():
        out = None
        for _ in range(calls):
            out = fn(key, next(counter), batch)
        jax.block_until_ready(out)

    return run
