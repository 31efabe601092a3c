"""End to end on a synthetic task: a tiny Transformer learns to reverse sequences."""

import jax
import numpy as np
import pytest

from experiments.benchmarks import measure
from experiments.translation import bleu, data, decode, steps
from experiments.translation import model as model_lib

EOS = 3


def _reversal(n, rng):
    src = [np.array([*rng.integers(4, 16, rng.integers(3, 9)), EOS], np.int32) for _ in range(n)]
    return src, [np.array([*s[-2::-1], EOS], np.int32) for s in src]


def _text(row):
    row = list(row)
    return ' '.join(f'w{i}' for i in row[:row.index(EOS) if EOS in row else len(row)] if i)


@pytest.mark.slow
def test_tiny_transformer_learns_to_reverse_with_bleu_above_90():
    rng = np.random.default_rng(0)
    src, tgt = _reversal(4000, rng)
    test_src, test_tgt = _reversal(100, rng)
    plan = data.make_plan(src, tgt, max_tokens=512, buckets=(8, 16))
    config = model_lib.tiny(16, d_model=64, ffn_dim=128, dropout=0.0)
    graphdef, params, rest = steps.init_model(config, seed=0)
    tx = steps.make_optimizer('none', learning_rate=2e-3, warmup_steps=100, weight_decay=0.0)
    opt_state = tx.init(params)
    train_step = jax.jit(steps.make_train_step(graphdef, tx, smoothing=0.0))
    with measure.CompileCounter('train_step') as compiles:
        for step in range(350):
            batch = data.make_batch(src, tgt, *plan.batch(step, seed=0))
            params, opt_state, metrics = train_step(params, rest, opt_state, batch,
                                                    steps.dropout_key(0, step))
    # Near 0.1 (the last digits depend on XLA's CPU code: 0.1008 at LLVM -O0, below 0.1 at
    # the default level); the decoding checks below are the point.
    assert float(metrics['loss']) < 0.15, float(metrics['loss'])
    assert compiles.count == len(plan.buckets) == 2  # one compilation per bucket

    references = [_text(t) for t in test_tgt]
    for beam_size, name in ((1, 'greedy_search'), (5, 'beam_search')):
        with measure.CompileCounter(name) as compiles:
            tokens = decode.translate(graphdef, params, rest, test_src, max_tokens=512,
                                      beam_size=beam_size, max_len_a=1.0, max_len_b=2)
        assert compiles.count == 2  # once per bucket
        hypotheses = bleu.detokenize(_text, tokens)
        assert bleu.corpus_bleu(hypotheses, references) >= 90, bleu.format_samples(
            [_text(s) for s in test_src], hypotheses, references)


def test_bleu_helpers():
    same = ['the cat sat on the mat']
    assert bleu.corpus_bleu(same, same) == pytest.approx(100)
    assert bleu.corpus_bleu(['a b c d'], ['w x y z']) == 0.0
    with pytest.raises(ValueError, match='translate every reference'):
        bleu.corpus_bleu(['a'], ['a', 'b'])
    block = bleu.format_samples(['s0', 's1'], ['h0', 'h1'], ['t0', 't1'], n=1)
    assert block == '[0] S: s0\n    H: h0\n    T: t0'
