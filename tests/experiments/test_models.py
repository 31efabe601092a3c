"""Tests for the CIFAR models: shapes, parameter counts, BatchNorm, dtypes, registry."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.image_classification import models
from experiments.image_classification.models import pyramidnet, resnet, wide_resnet

# Tiny versions of every registered model: same depth and topology, a handful of channels.
TINY = {
    'cnn': {'width': 2, 'hidden': 8},
    'resnet18': {'width': 4},
    'resnet34': {'width': 2},
    'wrn': {'depth': 10, 'widen_factor': 2, 'base_width': 2},
    'wrn28_10': {'base_width': 1},
    'wrn16_4': {'base_width': 2},
    'pyramidnet': {'depth': 8, 'alpha': 6, 'base_width': 2},
    'pyramidnet110': {'base_width': 2},
    'pyramidnet272': {'base_width': 2},
}
DIGITS = (3, 8, 8, 1)  # sklearn digits
CIFAR = (3, 32, 32, 3)
# Small enough to run for real on CPU: every family and shortcut kind, digits- and CIFAR-sized
# inputs, and an odd size (7 -> 4 -> 2) where the ceil-mode pooled shortcut must match the
# stride-2 convolution.
RUNNABLE = [
    ('cnn', {'width': 4, 'hidden': 8}, (3, 28, 28, 1)),
    ('resnet18', {'width': 4}, DIGITS),
    ('wrn', {'depth': 10, 'widen_factor': 2, 'base_width': 2}, CIFAR),
    ('wrn', {'depth': 10, 'widen_factor': 2, 'base_width': 2, 'shortcut': 'zero_pad'}, DIGITS),
    ('pyramidnet', {'depth': 8, 'alpha': 6, 'base_width': 2}, CIFAR),
    ('pyramidnet', {'depth': 11, 'alpha': 6, 'base_width': 2, 'bottleneck': True}, (3, 7, 7, 1)),
]


def abstract_variables(model, shape):
    """Variable shapes and dtypes from a real ``init``, without running it."""
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def numpy_variables(model, shape):
    """Deterministic stand-in variables made with NumPy.

    Compiling a model's PRNG initialisation takes tens of seconds on a small shared CPU; the
    forward-pass tests only need sensible values (the initialisers are tested on their own).
    """
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            return rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(
                math.prod(leaf.shape[:-1]))
        return (np.ones if name in ('scale', 'var') else np.zeros)(leaf.shape, np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, shape))


def num_params(variables):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(variables['params']))


def test_every_name_has_a_tiny_config():
    assert set(TINY) == set(models.MODEL_NAMES)


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_output_shape_every_model(name):
    # Digits-sized inputs run for real, per family, in test_forward_and_batch_stats.
    model = models.get_model(name, num_classes=7, **TINY[name])
    logits, _ = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros(CIFAR), train=False))
    assert logits.shape == (CIFAR[0], 7)
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize('name,kwargs,shape', RUNNABLE)
def test_forward_and_batch_stats(name, kwargs, shape):
    model = models.get_model(name, num_classes=5, **kwargs)
    variables = numpy_variables(model, shape)
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)

    @jax.jit
    def run(variables, x):
        return (model.apply(variables, x, train=True, mutable=['batch_stats']),
                model.apply(variables, x, train=False, mutable=['batch_stats']))

    (train_logits, train_vars), (eval_logits, eval_vars) = run(variables, x)
    for logits in (train_logits, eval_logits):
        assert logits.shape == (shape[0], 5)
        assert logits.dtype == jnp.float32
        assert np.all(np.isfinite(logits))
    # Training normalises with batch statistics, evaluation with the running averages.
    assert not np.allclose(train_logits, eval_logits)
    old = variables['batch_stats']
    changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), old, train_vars['batch_stats'])
    assert all(jax.tree.leaves(changed))
    jax.tree.map(np.testing.assert_array_equal, old, eval_vars['batch_stats'])


@pytest.mark.parametrize('name,num_classes,kwargs,expected', [
    # The CIFAR ResNets of the SAM/VaSSO code: bias-free convolutions; BatchNorm scale and
    # bias are parameters, its running statistics are not.
    ('resnet18', 10, {}, 11_173_962),
    ('resnet34', 10, {}, 21_282_122),
    ('wrn28_10', 10, {}, 36_479_194),
    ('wrn16_4', 10, {}, 2_748_890),
    # PyramidNet-110 with alpha=270 ends 16 + 270 = 286 channels wide and has 28.5M
    # parameters (Han et al. 2017 list it as 28.3M; 28,485,477 is also the count of the
    # independent osmr/imgclsmob port). The "1.7M" often quoted is PyramidNet-110 with
    # alpha=48, the paper's smallest model: 1,772,706 here.
    ('pyramidnet110', 10, {}, 28_485_477),
    ('pyramidnet110', 100, {}, 28_511_307),
    ('pyramidnet', 10, {'alpha': 48}, 1_772_706),
    # 3x3 convs 1-16-16-32-32 (no bias), 4 BatchNorms, 7x7x32 -> 128 -> 10.
    ('cnn', 10, {}, 9 * (16 + 16 * 16 + 16 * 32 + 32 * 32) + 2 * 96 + 1569 * 128 + 129 * 10),
])
def test_parameter_count(name, num_classes, kwargs, expected):
    model = models.get_model(name, num_classes=num_classes, **kwargs)
    shape = (1, 28, 28, 1) if name == 'cnn' else (1, 32, 32, 3)
    assert num_params(abstract_variables(model, shape)) == expected


def test_zero_pad_shortcut_has_no_projection_parameters():
    def count(shortcut):
        model = models.get_model('wrn28_10', 10, shortcut=shortcut)
        return num_params(abstract_variables(model, (1, 32, 32, 3)))

    # The three 1x1 projections: 16->160, 160->320, 320->640.
    assert count('projection') - count('zero_pad') == 16 * 160 + 160 * 320 + 320 * 640


def test_batch_norm_matches_pytorch_defaults():
    bn = resnet.batch_norm(train=True)
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(64, 4)).astype(np.float32)
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x, mutable=['batch_stats'])
    # Flax momentum 0.9 is PyTorch's 0.1: the first update moves the mean a tenth of the way.
    np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5), atol=1e-4)


def test_conv_init_is_kaiming_normal_fan_out():
    # An 'rbg' key: the same initialiser, but it compiles in a fraction of threefry's time.
    key = jax.random.key(0, impl='rbg')
    kernel = resnet.conv(64, 3).init(key, jnp.zeros((1, 4, 4, 16)))['params']['kernel']
    assert kernel.shape == (3, 3, 16, 64)
    std = math.sqrt(2 / (3 * 3 * 64))
    np.testing.assert_allclose(np.std(kernel), std, rtol=0.05)
    # Untruncated, as torchvision's (flax's he_normal truncates at 2 sigma).
    assert np.max(np.abs(kernel)) > 2.5 * std


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.get_model('resnet18', num_classes=4, width=4, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(abstract_variables(model, DIGITS)))

    @jax.jit
    def run(variables, x):
        return model.apply(variables, x, train=True, capture_intermediates=True,
                           mutable=['batch_stats', 'intermediates'])

    logits, state = run(numpy_variables(model, DIGITS), np.ones(DIGITS, np.float32))
    assert logits.dtype == jnp.float32
    # The body really computes in bfloat16, but the running statistics stay float32.
    assert state['intermediates']['Conv_0']['__call__'][0].dtype == jnp.bfloat16
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(state['batch_stats']))


def test_dropout_uses_the_dropout_key_and_is_off_in_eval():
    model = models.get_model('wrn', 3, dropout_rate=0.5, depth=10, widen_factor=2, base_width=2)
    variables = numpy_variables(model, DIGITS)
    x = np.random.default_rng(1).normal(size=DIGITS).astype(np.float32)

    @jax.jit
    def run(seed):
        rngs = {'dropout': jax.random.key(seed, impl='rbg')}
        train = model.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)[0]
        return train, model.apply(variables, x, train=False, rngs=rngs)

    (train0, eval0), (train1, eval1) = run(0), run(1)
    assert not np.allclose(train0, train1)
    np.testing.assert_array_equal(eval0, eval1)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown model 'resnet50'; valid names: cnn, resnet18, "):
        models.get_model('resnet50', num_classes=10)


def test_a_named_architecture_cannot_be_changed_by_its_kwargs():
    with pytest.raises(ValueError, match="Model 'wrn28_10' has depth=28, not 16; use 'wrn'"):
        models.get_model('wrn28_10', 10, depth=16)
    with pytest.raises(ValueError, match="'pyramidnet110' has alpha=270, not 48; use 'pyram"):
        models.get_model('pyramidnet110', 10, alpha=48)
    same = models.get_model('wrn28_10', 10, depth=28, widen_factor=10, dropout_rate=0.3)
    assert (same.depth, same.widen_factor, same.dropout_rate) == (28, 10, 0.3)


@pytest.mark.parametrize('module,match', [
    (wide_resnet.WideResNet(10, depth=27), r'depth must be 6n\+4'),
    (wide_resnet.WideResNet(10, depth=10, shortcut='identity'), 'shortcut must be one of'),
    (pyramidnet.PyramidNet(10, depth=111), r'depth must be 6n\+2'),
    (pyramidnet.PyramidNet(10, depth=100, bottleneck=True), r'depth must be 9n\+2'),
])
def test_bad_architecture_arguments_raise(module, match):
    with pytest.raises(ValueError, match=match):
        abstract_variables(module, DIGITS)
