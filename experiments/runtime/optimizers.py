"""The optimiser of a run, built from its config by name and keyword arguments.

``tx = chain(link, weight decay, base)``, what a user of ``vasso_jax`` writes by hand:

- the sharpness-aware link: ``--config.optimizer`` names any ``vasso_jax`` factory that takes
  a radius ``rho`` (``sam``, ``vasso``, ``asam``, ``friendly_sam``, and any added later), or
  ``sgd`` for none. The top-level keys ``rho``, ``theta``, ``adaptive``, ``eta`` and
  ``every_k`` go to the factory when it takes them; any other argument comes from
  ``--config.optimizer_kwargs`` (e.g. ``--config.optimizer_kwargs.sigma=0.5`` for
  ``friendly_sam``). The library checks its hyperparameters itself: its one-line
  ``ValueError`` becomes a :class:`~experiments.runtime.errors.ConfigError`.
- the base optimiser: ``--config.base_optimizer`` names any optax alias that takes a
  ``learning_rate`` (``sgd``, ``adamw``, ``lion``, ...), called with the learning-rate schedule,
  ``--config.base_optimizer_kwargs`` and, when it takes one, ``weight_decay``; an alias without
  ``weight_decay`` (e.g. ``sgd``) gets ``optax.add_decayed_weights`` before it. ``momentum``
  and ``nesterov`` are ``sgd``'s (the paper's recipe).

Weight decay comes after the link, so it is not part of the ascent.

A one-pass link (``one_pass_vasso``, ``one_pass_momentum_sam``: any ``vasso_jax`` factory
whose first argument is the ``base`` it wraps) is built *around* ``chain(weight decay, base)``
instead: ``tx = one_pass_vasso(chain(add_decayed_weights, sgd), rho, theta)``. Its train step
takes one gradient (no ``grad_fn``) and the params it holds are the perturbed point;
:func:`eval_params` gives the weights to evaluate.

``every_k > 1`` on a two-pass link is host dispatch: :func:`make_optimizers` returns the chain
with ``every_k = 1`` and the same chain with ``rho = 0`` (no second pass, the same state), and
the run picks one per step on the host (steps 0, k, 2k, ... take two passes), as the library's
``every_k`` would with its ``lax.cond``, which :func:`make_optimizer` still builds.
"""

import inspect
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

import vasso_jax
from experiments.runtime import errors

LR_SCHEDULES = ('cosine', 'constant', 'inverse_sqrt')
# The vmap axis over example groups of m-sharpness (config.ascent_group_size > 0).
GROUP_AXIS = 'ascent_group'
# Scalars the sharpness-aware link keeps in its state (read with optax.tree.get).
LINK_DIAGNOSTICS = ('grad_norm', 'direction_norm', 'cosine')
# What vasso_jax.track_stability keeps in the state (config.log_stability).
STABILITY_DIAGNOSTICS = ('eps_cosine', 'eps_mean_cosine', 'eps_variance')
# Top-level config keys given to the link factory when it takes them (the paper's knobs).
LINK_KEYS = ('rho', 'theta', 'adaptive', 'eta', 'every_k')
# Keys the run sets on the link itself.
_RUN_LINK_KEYS = ('axis_name', 'ascent', 'keep_perturbation')


def _parameters(factory) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(factory).parameters)


def _public_factories():
    """``(name, factory, parameters)`` of every public function of ``vasso_jax``."""
    for name in vasso_jax.__all__:
        factory = getattr(vasso_jax, name)
        if inspect.isfunction(factory):
            yield name, factory, _parameters(factory)


def link_factories() -> dict:
    """The ``vasso_jax`` factories ``--config.optimizer`` may name: public, with a ``rho``
    and every argument defaulted (two-pass links), or a ``base`` first and every argument
    but ``base`` and ``rho`` defaulted (one-pass links, :func:`one_pass_factories`)."""
    factories = {
        name: factory for name, factory, params in _public_factories()
        if 'rho' in params and all(p.default is not p.empty for p in params.values())}
    return {**factories, **one_pass_factories()}


def one_pass_factories() -> dict:
    """The ``vasso_jax`` factories that wrap a base optimiser (``one_pass_vasso``,
    ``one_pass_momentum_sam``): ``base`` first, a ``rho``, every other argument defaulted."""
    return {
        name: factory for name, factory, params in _public_factories()
        if list(params)[:1] == ['base'] and 'rho' in params
        and all(p.default is not p.empty for n, p in params.items() if n not in ('base', 'rho'))}


def is_one_pass(config: ml_collections.ConfigDict) -> bool:
    """Whether ``config.optimizer`` is a one-pass link (one gradient a step, no ``grad_fn``)."""
    return config.optimizer in one_pass_factories()


def host_every_k(config: ml_collections.ConfigDict) -> int:
    """k of the run's host dispatch: ``config.every_k`` for a two-pass link, else 1."""
    if config.optimizer == 'sgd' or is_one_pass(config):
        return 1
    return config.get('every_k', 1)


def base_factory(name: str):
    """The optax alias ``name`` (anything taking a ``learning_rate``), or ConfigError."""
    factory = getattr(optax, name, None) if isinstance(name, str) else None
    if not inspect.isfunction(factory) or 'learning_rate' not in _parameters(factory):
        raise errors.ConfigError(
            f'--config.base_optimizer={name!r} is not an optax optimiser taking a learning rate '
            '(e.g. sgd, adamw, lion, adam, rmsprop).')
    return factory


def _kwargs(config, key: str) -> dict:
    value = config.get(key) or {}
    return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value)


def _check_kwargs(key: str, kwargs: dict, factory, owner: str, reserved=()) -> None:
    params = _parameters(factory)
    for name in kwargs:
        if name == 'base' and name in reserved:
            raise errors.ConfigError(
                f'--config.{key}.base: the run builds the base optimiser; set '
                '--config.base_optimizer and --config.base_optimizer_kwargs instead.')
        if name in reserved:
            raise errors.ConfigError(
                f'--config.{key}.{name}: set --config.{name} instead (the run sets {name} '
                'itself).' if name in _RUN_LINK_KEYS else
                f'--config.{key}.{name}: set --config.{name} instead.')
        if name not in params:
            valid = ', '.join(p for p in params if p not in reserved) or 'none'
            raise errors.ConfigError(
                f'--config.{key}.{name} is not an argument of {owner}; valid: {valid}.')


def make_sharpness_link(config: ml_collections.ConfigDict, base=None):
    """The ``vasso_jax`` link of ``config.optimizer`` (None for plain ``sgd``).

    A one-pass link wraps ``base`` (the chain of weight decay and the base optimiser).

    Raises:
      ConfigError: an unknown name or argument, or a hyperparameter the library rejected.
    """
    factories = link_factories()
    name = config.optimizer
    if name == 'sgd':
        if config.get('ascent_group_size', 0):
            raise errors.ConfigError(
                '--config.ascent_group_size needs a sharpness-aware --config.optimizer '
                f'({", ".join(factories)}), not sgd.')
        return None
    if name not in factories:
        raise errors.ConfigError(
            f'--config.optimizer={name!r} is not one of sgd, {", ".join(factories)}.')
    factory = factories[name]
    params = _parameters(factory)
    kwargs = _kwargs(config, 'optimizer_kwargs')
    _check_kwargs('optimizer_kwargs', kwargs, factory, f'vasso_jax.{name}',
                  reserved=LINK_KEYS + _RUN_LINK_KEYS + ('base',))
    kwargs.update({k: config[k] for k in LINK_KEYS if k in params and k in config})
    if name in one_pass_factories():
        _check_one_pass(config, name)
        kwargs['base'] = base
    if config.get('ascent_group_size', 0):  # m-sharpness: groups are a vmap axis
        kwargs.update(axis_name=GROUP_AXIS, ascent='per_device')
    if config.get('log_stability', False):  # keep eps_t for vasso_jax.track_stability
        kwargs['keep_perturbation'] = True
    try:
        return factory(**kwargs)
    except ValueError as e:  # vasso_jax checks hyperparameters eagerly
        raise errors.ConfigError(f'{_flag_of(str(e))}: {e}') from e


def _check_one_pass(config: ml_collections.ConfigDict, name: str) -> None:
    """The run options a one-pass link cannot take, as one-line ConfigErrors."""
    for key, value, why in (
            ('every_k', config.get('every_k', 1) != 1, 'it takes one gradient every step'),
            ('ascent_group_size', config.get('ascent_group_size', 0), 'it has no ascent pass'),
            ('log_stability', config.get('log_stability', False),
             'its state keeps grad_norm, direction_norm and cosine')):
        if value:
            raise errors.ConfigError(
                f'--config.{key} does not apply to the one-pass --config.optimizer={name} '
                f'({why}); leave it at its default or use a two-pass link.')


def _flag_of(message: str) -> str:
    """The flag that sets the argument a library error names (``'...: rho=-1 is ...'``)."""
    named = re.search(r'\b(\w+)=', message)
    if named is None:
        return '--config.optimizer'
    key = named.group(1)
    return f'--config.{key}' if key in LINK_KEYS else f'--config.optimizer_kwargs.{key}'


def make_base_optimizer(config: ml_collections.ConfigDict, schedule) -> list:
    """``[add_decayed_weights, alias]`` or ``[alias]`` for ``config.base_optimizer``."""
    name = config.base_optimizer
    factory = base_factory(name)
    params = _parameters(factory)
    kwargs = _kwargs(config, 'base_optimizer_kwargs')
    _check_kwargs('base_optimizer_kwargs', kwargs, factory, f'optax.{name}',
                  reserved=('learning_rate', 'weight_decay'))
    if name == 'sgd':
        kwargs = {'momentum': config.momentum or None, 'nesterov': config.nesterov, **kwargs}
    decay = []
    if 'weight_decay' in params:
        kwargs['weight_decay'] = config.weight_decay
    else:
        decay = [optax.add_decayed_weights(config.weight_decay)]
    try:
        return [*decay, factory(schedule, **kwargs)]
    except (ValueError, TypeError) as e:
        raise errors.ConfigError(f'{e} (from --config.base_optimizer={name})') from e


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """``chain(link, add_decayed_weights, sgd)``, ``chain(link, adamw)``, ... (see above).

    With ``config.log_stability`` the link is wrapped by ``vasso_jax.track_stability``, so
    the state also holds :data:`STABILITY_DIAGNOSTICS`.
    """
    base = make_base_optimizer(config, schedule)
    if is_one_pass(config):  # the link wraps the base: weight decay inside it
        return make_sharpness_link(config, optax.chain(*base))
    link = make_sharpness_link(config)
    if link is not None and config.get('log_stability', False):
        link = vasso_jax.track_stability(link)
    return optax.chain(*([link] if link is not None else []), *base)


def make_optimizers(config: ml_collections.ConfigDict, schedule: optax.Schedule):
    """``(tx, plain_tx)``: the run's chain, and for ``every_k > 1`` (host dispatch) the same
    chain with ``rho = 0`` (``plain_tx`` is None otherwise).

    ``tx`` is :func:`make_optimizer`'s chain with ``every_k = 1``, the two-pass step;
    ``plain_tx`` skips the second pass and has the same state (checked by
    :func:`check_same_state`), so one state passes between the two executables.
    """
    k = host_every_k(config)
    # Built as given first: the library's own check of every_k (an integer >= 1) names it.
    tx = make_optimizer(config, schedule)
    if k == 1:
        return tx, None
    if config.get('log_stability', False):
        raise errors.ConfigError(
            f'--config.log_stability does not combine with --config.every_k={k}: the off-steps '
            'run the rho = 0 chain, which keeps a zero perturbation; set one to its default.')
    sharp, plain = config.copy_and_resolve_references(), config.copy_and_resolve_references()
    sharp.every_k = plain.every_k = 1
    plain.rho = 0.0
    return make_optimizer(sharp, schedule), make_optimizer(plain, schedule)


def check_same_state(tx, plain_tx, params) -> None:
    """Raises RuntimeError unless ``tx`` and ``plain_tx`` have the same state layout (tree,
    shapes, dtypes) on ``params``: what lets host dispatch pass one state between them."""
    layout = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(t.init, params))
    if layout(tx) != layout(plain_tx):
        raise RuntimeError('every_k by host dispatch: the rho = 0 chain has another state '
                           'layout than the two-pass chain; this is a bug.')


def holds_one_pass(opt_state) -> bool:
    """Whether ``opt_state`` is (or contains) a one-pass link's state."""
    is_state = lambda x: isinstance(x, vasso_jax.OnePassState)
    return any(map(is_state, jax.tree.leaves(opt_state, is_leaf=is_state)))


def eval_params(params, opt_state):
    """The weights to evaluate, checksum and export: ``vasso_jax.unperturbed_params`` under a
    one-pass link (its held params are the perturbed point), else ``params``."""
    if holds_one_pass(opt_state):
        return vasso_jax.unperturbed_params(params, opt_state)
    return params


def warmup_steps(config: ml_collections.ConfigDict, epoch_steps: int) -> int:
    """Steps of linear warm-up: ``warmup_steps`` when > 0, else ``warmup_epochs`` epochs."""
    steps = int(config.get('warmup_steps', 0) or 0)
    return steps if steps > 0 else int(config.warmup_epochs * epoch_steps)


def inverse_sqrt_schedule(peak_lr: float, warmup: int) -> optax.Schedule:
    r"""fairseq's ``inverse_sqrt`` after its warm-up: ``peak_lr * sqrt(warmup / t)``.

    Counted from the end of the warm-up (as ``optax.join_schedules`` counts): at count
    ``c`` the update number is ``t = warmup + c``, so the rate is ``peak_lr`` when the
    warm-up ends and halves by ``t = 4 * warmup``.

    Examples:
      >>> float(inverse_sqrt_schedule(1.0, 100)(300))
      0.5
    """
    if warmup < 1:
        raise ValueError(f'warmup={warmup} must be >= 1 for the inverse-sqrt decay.')

    def schedule(count):
        return peak_lr * jnp.sqrt(warmup / (jnp.asarray(count, jnp.float32) + warmup))

    return schedule


def make_schedule(config: ml_collections.ConfigDict, num_steps: int,
                  epoch_steps: int) -> optax.Schedule:
    """Learning rate per step: optional linear warm-up from 0, then cosine to
    ``min_learning_rate``, constant, or ``inverse_sqrt`` (``lr * sqrt(warmup / t)``,
    fairseq's, which needs a warm-up)."""
    lr = config.learning_rate
    warmup = warmup_steps(config, epoch_steps)
    if config.lr_schedule == 'constant':
        main = optax.constant_schedule(lr)
    elif config.lr_schedule == 'inverse_sqrt':
        main = inverse_sqrt_schedule(lr, warmup)
    else:
        main = optax.cosine_decay_schedule(
            lr, max(num_steps - warmup, 1), alpha=config.min_learning_rate / lr if lr else 0.0)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def link_diagnostics(opt_state) -> tuple[str, ...]:
    """Names in :data:`LINK_DIAGNOSTICS` and :data:`STABILITY_DIAGNOSTICS` that ``opt_state``
    holds (none for plain SGD)."""
    names = LINK_DIAGNOSTICS + STABILITY_DIAGNOSTICS
    return tuple(n for n in names if optax.tree.get(opt_state, n) is not None)
