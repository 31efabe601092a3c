"""Training core: the schedule, and a second pass on the same batch and dropout mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import vasso_jax.nnx
from experiments.translation import data, steps
from experiments.translation import model as model_lib


def _setup():
    config = model_lib.tiny(20, encoder_layers=1, decoder_layers=1, dropout=0.3)
    graphdef, params, rest = steps.init_model(config, seed=0)
    rng = np.random.default_rng(0)
    src = [np.array([*rng.integers(4, 20, n), 3], np.int32) for n in (3, 5, 6, 4)]
    tgt = [np.array([*rng.integers(4, 20, n), 3], np.int32) for n in (4, 2, 6, 5)]
    batch = data.make_batch(src, tgt, np.arange(4), 8)
    return graphdef, params, rest, jax.tree.map(jnp.asarray, batch)


def test_inverse_sqrt_schedule_is_fairseqs():
    schedule = steps.inverse_sqrt_schedule(5e-4, 4000, init_lr=1e-7)
    for t, expected in [(0, 1e-7), (2000, 1e-7 + (5e-4 - 1e-7) / 2), (4000, 5e-4),
                        (16000, 2.5e-4)]:
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-6)
    with pytest.raises(ValueError, match='warmup_steps'):
        steps.inverse_sqrt_schedule(5e-4, 0)


def test_loss_given_the_same_key_is_deterministic_and_the_key_matters():
    graphdef, params, rest, batch = _setup()
    loss = jax.jit(lambda p, k: steps.loss_fn(p, graphdef, rest, batch, k)[0])
    key = steps.dropout_key(0, 7)
    assert float(loss(params, key)) == float(loss(params, key))
    assert float(loss(params, key)) != float(loss(params, steps.dropout_key(0, 8)))


@pytest.mark.parametrize('method', ['vasso'])  # sam: same engine, same second pass
def test_rho_zero_step_equals_the_adamw_step_exactly(method):
    # With rho = 0 the second pass is at the same point; it equals the first gradient only
    # if it sees the same batch and the same dropout mask.
    graphdef, params, rest, batch = _setup()
    key = steps.dropout_key(0, 3)
    results = []
    for tx in (steps.make_optimizer('none', warmup_steps=1),
               steps.make_optimizer(method, rho=0.0, warmup_steps=1)):
        step = jax.jit(steps.make_train_step(graphdef, tx))
        p, _, metrics = step(params, rest, tx.init(params), batch, key)
        results.append((p, metrics))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sam_second_pass_uses_the_first_pass_dropout_mask():
    # The step's update must equal AdamW applied to grad(loss)(w + eps) with eps from the
    # same key; a different key in the second pass would give a different update.
    graphdef, params, rest, batch = _setup()
    key, rho = steps.dropout_key(0, 5), 0.05
    loss = lambda p, k: steps.loss_fn(p, graphdef, rest, batch, k)[0]
    grad = jax.jit(jax.grad(loss))
    g1 = grad(params, key)
    norm = np.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(g1)))
    perturbed = jax.tree.map(lambda w, g: w + rho * g / norm, params, g1)
    g2 = grad(perturbed, key)
    adamw = steps.make_optimizer('none', warmup_steps=1)
    expected, _ = adamw.update(g2, adamw.init(params), params)
    tx = steps.make_optimizer('sam', rho=rho, warmup_steps=1)
    new, _, _ = jax.jit(steps.make_train_step(graphdef, tx))(params, rest, tx.init(params),
                                                             batch, key)
    for w, u, n in zip(jax.tree.leaves(params), jax.tree.leaves(expected), jax.tree.leaves(new)):
        np.testing.assert_allclose(np.asarray(n), np.asarray(w + u), rtol=1e-5, atol=1e-7)


def test_evaluate_over_batches_equals_one_batch():
    graphdef, params, rest, batch = _setup()
    eval_step = jax.jit(steps.make_eval_step(graphdef))
    sums = eval_step(params, rest, batch)
    tokens = float(sums['tokens'])
    assert tokens == int((np.asarray(batch['tgt_out']) != 0).sum())
    # The same four examples in two batches of three rows (two empty filler rows): same sums.
    src = [row[row != 0] for row in np.asarray(batch['src'])]
    tgt = [row[row != 0] for row in np.asarray(batch['tgt_out'])]
    result = steps.evaluate(eval_step, params, rest, src, tgt,
                            data.make_plan(src, tgt, max_tokens=24, buckets=(8,)))
    np.testing.assert_allclose(result['loss'], float(sums['loss_sum']) / tokens, rtol=1e-5)
    np.testing.assert_allclose(result['perplexity'],
                               np.exp(float(sums['nll_sum']) / tokens), rtol=1e-5)
    assert result['tokens'] == tokens


def test_unknown_method_names_the_choices():
    with pytest.raises(ValueError, match="choose one of \\('none', 'sam', 'vasso'\\)"):
        steps.make_optimizer('adam')


def test_the_functional_two_passes_equal_vasso_jax_nnx_value_and_grad():
    # The model holds parameters only (dropout takes an explicit key), so the functional
    # form of steps.value_grads_and_grad_fn needs no snapshot; it must agree with the
    # library's NNX wrapper on the loss, the gradient and the second pass.
    graphdef, params, rest, batch = _setup()
    key = steps.dropout_key(0, 2)

    def model_loss(model, batch, key):
        logits = model(batch['src'], batch['tgt_in'], key=key)
        sums = model_lib.label_smoothed_loss(logits, batch['tgt_out'])
        return sums[0] / sums[2]

    @jax.jit
    def both(params):
        loss = lambda p: steps.loss_fn(p, graphdef, rest, batch, key)
        (value, _), grads, grad_fn = steps.value_grads_and_grad_fn(loss, params)
        perturbed = jax.tree.map(lambda w, g: w + 0.05 * g, params, grads)
        model = nnx.merge(graphdef, params, rest)
        nnx_value, nnx_grads, nnx_grad_fn = vasso_jax.nnx.value_and_grad(model_loss)(
            model, batch, key)
        return ((value, grads, grad_fn(perturbed)),
                (nnx_value, nnx_grads, nnx_grad_fn(perturbed)))

    ours, theirs = both(params)
    leaves = jax.tree.leaves(ours)
    assert len(leaves) == len(jax.tree.leaves(theirs)) > 3
    for a, b in zip(leaves, jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
