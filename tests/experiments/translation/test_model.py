"""The Transformer: incremental decoding equals a full recompute; beam 1 equals greedy; loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.translation import decode, steps
from experiments.translation import model as model_lib

VOCAB = 24


def _model(**overrides):
    return steps.init_model(model_lib.tiny(VOCAB, **{"encoder_layers": 1, **overrides}), seed=1)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, params, rest, src, tgt_in, key=None):
    return nnx.merge(graphdef, params, rest)(src, tgt_in, key=key)


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, params, rest, tokens, t, cache):
    return nnx.merge(graphdef, params, rest).decode_step(tokens, t, cache)


def _src():
    # Two sentences of different lengths (EOS = 3, then padding).
    return jnp.array([[5, 9, 11, 7, 3, 0, 0], [12, 6, 3, 0, 0, 0, 0]], jnp.int32)


def _searchable():
    """A random model made to end some outputs early, and six sources to decode.

    At initialisation the decoder repeats one token until EOS is forced; larger weights
    and a bias towards EOS in the last LayerNorm give varied outputs that end at
    different steps, which is what the searches have to get right.
    """
    graphdef, params, rest = _model()
    params = jax.tree.map(lambda x: 2 * x, params)
    eos_row = params['embed']['embedding'][...][3]
    params['decoder'][1]['norms'][2]['bias'][...] = 7 * eos_row / jnp.sum(eos_row ** 2)
    rng = np.random.default_rng(0)
    src = np.where(np.arange(7) < rng.integers(2, 7, (6, 1)), rng.integers(4, 24, (6, 7)), 0)
    return (graphdef, params, rest), jnp.asarray(src, jnp.int32)


def _log_probs(model, src, tokens):
    """float64 log p of every output token given the prefix, by a full teacher-forced pass."""
    graphdef, params, rest = model
    tgt_in = jnp.concatenate([jnp.full((len(tokens), 1), 2), tokens[:, :-1]], axis=1)
    return np.asarray(jax.nn.log_softmax(_apply(graphdef, params, rest, src, tgt_in)),
                      np.float64)


def _normalised_score(logp, row, penalty):
    n = list(row).index(3) + 1
    return sum(logp[i, row[i]] for i in range(n)) / n ** penalty


@pytest.mark.parametrize('normalize_before', [False, True])
def test_incremental_decoding_equals_full_recompute(normalize_before):
    graphdef, params, rest = _model(normalize_before=normalize_before)
    src = _src()
    tgt_in = jnp.array([[2, 8, 4, 19, 5, 6], [2, 13, 13, 7, 22, 9]], jnp.int32)
    full = np.asarray(_apply(graphdef, params, rest, src, tgt_in))
    cache = nnx.merge(graphdef, params, rest).init_cache(src, tgt_in.shape[1])
    for t in range(tgt_in.shape[1]):
        logits, cache = _step(graphdef, params, rest, tgt_in[:, t], t, cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-5, atol=1e-5)


def test_beam_of_one_equals_greedy_token_for_token():
    model, src = _searchable()
    greedy = decode.greedy_search(*model, src, max_len=9)
    beam, _ = decode.beam_search(*model, src, max_len=9, beam_size=1)
    np.testing.assert_array_equal(np.asarray(beam), np.asarray(greedy))
    # fairseq's constraints: no EOS first, EOS by the last step, PAD after it; never
    # PAD or BOS before the end.
    greedy = np.asarray(greedy)
    ends = [list(row).index(3) for row in greedy]
    assert min(ends) < 8 and max(ends) == 8  # some end early, some are forced to end
    for row, end in zip(greedy, ends):
        assert (row[end + 1:] == 0).all() and not np.isin(row[:end], [0, 2, 3]).any()


def test_beam_search_score_is_the_length_normalised_log_prob():
    model, src = _searchable()
    tokens, scores = decode.beam_search(*model, src, max_len=9, beam_size=3, length_penalty=0.7)
    logp = _log_probs(model, src, tokens)
    for b in range(src.shape[0]):
        expected = _normalised_score(logp[b], np.asarray(tokens[b]), 0.7)
        np.testing.assert_allclose(float(scores[b]), expected, rtol=1e-4)


def test_label_smoothed_loss_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = np.array([[4, 1, 6, 0, 0], [5, 5, 2, 3, 0]])
    loss, nll, tokens = model_lib.label_smoothed_loss(jnp.asarray(logits), jnp.asarray(targets),
                                                      smoothing=0.1)
    x = logits.astype(np.float64)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    mask = targets != 0
    q = np.full(x.shape, 0.1 / 6)  # the smoothed target distribution: 0.9 on the target
    np.put_along_axis(q, targets[..., None], 0.9, axis=-1)
    np.testing.assert_allclose(float(loss), -(q * logp).sum(-1)[mask].sum(), rtol=1e-5)
    picked = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(nll), -picked[mask].sum(), rtol=1e-5)
    assert float(tokens) == mask.sum()


def test_dropout_key_controls_the_mask():
    graphdef, params, rest = _model(dropout=0.3)
    src, tgt_in = _src(), jnp.array([[2, 8, 4], [2, 13, 13]])
    run = lambda key: np.asarray(_apply(graphdef, params, rest, src, tgt_in, key))
    a = run(jax.random.key(0))
    np.testing.assert_array_equal(a, run(jax.random.key(0)))
    assert not np.allclose(a, run(jax.random.key(1)))
    assert not np.allclose(a, run(None))


def test_iwslt_config_is_fairseqs_transformer_iwslt_de_en():
    config = model_lib.iwslt_de_en(10_000)
    assert (config.encoder_layers, config.decoder_layers, config.d_model, config.ffn_dim,
            config.num_heads) == (6, 6, 512, 1024, 4)
    assert (config.dropout, config.attention_dropout, config.activation_dropout,
            config.normalize_before) == (0.3, 0.0, 0.0, False)
