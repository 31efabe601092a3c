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
"""

import inspect
import re

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


def link_factories() -> dict:
    """The ``vasso_jax`` factories ``--config.optimizer`` may name: public, with a ``rho``
    and every argument defaulted."""
    factories = {}
    for name in vasso_jax.__all__:
        factory = getattr(vasso_jax, name)
        if not inspect.isfunction(factory):
            continue
        params = _parameters(factory)
        if 'rho' in params and all(p.default is not p.empty for p in params.values()):
            factories[name] = factory
    return factories


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
        if name in reserved:
            raise errors.ConfigError(
                f'--config.{key}.{name}: set --config.{name} instead (the run sets {name} '
                'itself).' if name in _RUN_LINK_KEYS else
                f'--config.{key}.{name}: set --config.{name} instead.')
        if name not in params:
            valid = ', '.join(p for p in params if p not in reserved) or 'none'
            raise errors.ConfigError(
                f'--config.{key}.{name} is not an argument of {owner}; valid: {valid}.')


def make_sharpness_link(config: ml_collections.ConfigDict):
    """The ``vasso_jax`` link of ``config.optimizer`` (None for plain ``sgd``).

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
                  reserved=LINK_KEYS + _RUN_LINK_KEYS)
    kwargs.update({k: config[k] for k in LINK_KEYS if k in params and k in config})
    if config.get('ascent_group_size', 0):  # m-sharpness: groups are a vmap axis
        kwargs.update(axis_name=GROUP_AXIS, ascent='per_device')
    if config.get('log_stability', False):  # keep eps_t for vasso_jax.track_stability
        kwargs['keep_perturbation'] = True
    try:
        return factory(**kwargs)
    except ValueError as e:  # vasso_jax checks hyperparameters eagerly
        raise errors.ConfigError(f'{_flag_of(str(e))}: {e}') from e


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
    link = make_sharpness_link(config)
    if link is not None and config.get('log_stability', False):
        link = vasso_jax.track_stability(link)
    return optax.chain(*([link] if link is not None else []),
                       *make_base_optimizer(config, schedule))


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
