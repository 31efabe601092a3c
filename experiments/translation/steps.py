"""Training core: AdamW with fairseq's inverse-sqrt schedule, a sharpness-aware link before it,
and pure train / eval steps over a split NNX model.

The model is handled functionally: ``graphdef, params, rest = init_model(config, seed)``,
and every step merges it back inside the jitted function. The loss takes the dropout key
explicitly, so the sharpness-aware second pass (``grad_fn``) evaluates the same batch with
the same dropout mask as the first.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import vasso_jax
from experiments.translation import data
from experiments.translation import model as model_lib

METHODS = ('none', 'sam', 'vasso')


def init_model(config: model_lib.TransformerConfig, seed: int):
    """A fresh `model.Transformer`, split into ``(graphdef, params, rest)``."""
    model = model_lib.Transformer(config, rngs=nnx.Rngs(seed))
    return nnx.split(model, nnx.Param, ...)


def inverse_sqrt_schedule(peak_lr: float, warmup_steps: int, init_lr: float = 1e-7):
    """fairseq's ``inverse_sqrt``: linear warm-up to ``peak_lr``, then ``peak_lr * sqrt(W / t)``.

    With ``t`` the update count (0 for the first update) and ``W = warmup_steps``::

        lr(t) = init_lr + (peak_lr - init_lr) * t / W      for t < W
        lr(t) = peak_lr * sqrt(W / t)                       for t >= W
    """
    if warmup_steps < 1:
        raise ValueError(f'warmup_steps={warmup_steps} must be >= 1; fairseq uses 4000.')

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = init_lr + (peak_lr - init_lr) * t / warmup_steps
        decay = peak_lr * jnp.sqrt(warmup_steps / jnp.maximum(t, 1.0))
        return jnp.where(t < warmup_steps, warm, decay)

    return schedule


def make_optimizer(
    method: str = 'none',
    *,
    learning_rate: float = 5e-4,
    warmup_steps: int = 4000,
    weight_decay: float = 1e-4,
    b1: float = 0.9,
    b2: float = 0.98,
    eps: float = 1e-8,
    rho: float = 0.05,
    theta: float = 0.4,
) -> optax.GradientTransformationExtraArgs:
    """``[sam | vasso] -> adamw(inverse_sqrt)``: fairseq's IWSLT recipe with an optional link.

    Args:
      method: ``'none'`` (plain AdamW), ``'sam'`` or ``'vasso'``.
      learning_rate, warmup_steps: `inverse_sqrt_schedule`'s peak and warm-up.
      weight_decay: AdamW's decoupled weight decay (fairseq's ``--weight-decay``).
      b1, b2, eps: Adam's moments and epsilon (fairseq: ``--adam-betas '(0.9, 0.98)'``).
      rho: the perturbation radius of SAM / VaSSO.
      theta: VaSSO's EMA weight.
    """
    if method not in METHODS:
        raise ValueError(f'Unknown method {method!r}; choose one of {METHODS}.')
    link = {
        'none': (),
        'sam': (vasso_jax.sam(rho=rho),),
        'vasso': (vasso_jax.vasso(rho=rho, theta=theta),),
    }[method]
    schedule = inverse_sqrt_schedule(learning_rate, warmup_steps)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(*link, adamw)


def loss_fn(params, graphdef, rest, batch, key, *, smoothing: float = 0.1):
    """Mean label-smoothed loss per target token, and the sums ``(loss, nll, tokens)``.

    ``key`` is the dropout key (None: no dropout). Pure: the same arguments give the same
    value, dropout mask included.
    """
    model = nnx.merge(graphdef, params, rest)
    logits = model(batch['src'], batch['tgt_in'], key=key)
    sums = model_lib.label_smoothed_loss(logits, batch['tgt_out'], smoothing=smoothing,
                                         pad_id=model.config.pad_id)
    return sums[0] / jnp.maximum(sums[2], 1.0), sums


def value_grads_and_grad_fn(loss, params):
    """``(value, aux), grads`` of ``loss`` at ``params``, and ``grad_fn(p)`` of the same loss.

    ``loss(params) -> (value, aux)`` closes over the batch and the dropout key, so
    ``grad_fn`` (the sharpness-aware link's second pass) reuses both.
    """
    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
    grad_fn = lambda p: jax.grad(loss, has_aux=True)(p)[0]
    return (value, aux), grads, grad_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, *, smoothing: float = 0.1):
    """``train_step(params, rest, opt_state, batch, key) -> (params, opt_state, metrics)``.

    Not jitted (the caller jits, donating params and opt_state). ``batch`` is a
    `data.make_batch` dict; ``key`` the step's dropout key (see `dropout_key`). ``metrics``
    holds ``loss`` (mean per token), the sums ``loss_sum``, ``nll_sum``, ``tokens`` and
    ``grad_norm``, the norm of the first pass's gradient.
    """

    def train_step(params, rest, opt_state, batch, key):
        loss = functools.partial(loss_fn, graphdef=graphdef, rest=rest, batch=batch, key=key,
                                 smoothing=smoothing)
        (value, sums), grads, grad_fn = value_grads_and_grad_fn(loss, params)
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        params = optax.apply_updates(params, updates)
        metrics = dict(loss=value, loss_sum=sums[0], nll_sum=sums[1], tokens=sums[2],
                       grad_norm=optax.tree.norm(grads))
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef, *, smoothing: float = 0.1):
    """``eval_step(params, rest, batch) -> {loss_sum, nll_sum, tokens}``, without dropout."""

    def eval_step(params, rest, batch):
        _, sums = loss_fn(params, graphdef, rest, batch, None, smoothing=smoothing)
        return dict(loss_sum=sums[0], nll_sum=sums[1], tokens=sums[2])

    return eval_step


def evaluate(eval_step, params, rest, src, tgt, plan: data.Plan) -> dict[str, float]:
    """Loss, NLL and perplexity per target token over every example of ``plan``.

    ``eval_step`` is `make_eval_step`'s function, jitted (once per bucket); ``src``/``tgt``
    and ``plan`` as for `data.make_batch` and `data.make_plan`.
    """
    totals = None
    for indices, length in plan.ordered_batches():
        sums = eval_step(params, rest, data.make_batch(src, tgt, indices, length))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    tokens = max(totals['tokens'], 1.0)
    return dict(loss=totals['loss_sum'] / tokens, nll=totals['nll_sum'] / tokens,
                perplexity=perplexity(totals['nll_sum'], tokens), tokens=totals['tokens'])


def dropout_key(seed: int, step):
    """The dropout key of training step ``step``: a pure function, so resuming replays it."""
    return jax.random.fold_in(jax.random.key(seed), step)


def perplexity(nll_sum, tokens) -> float:
    """``exp(nll per token)`` (base-independent; fairseq prints ``2 ** loss_in_bits``)."""
    return float(jnp.exp(nll_sum / jnp.maximum(tokens, 1.0)))
