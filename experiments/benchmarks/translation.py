"""Step time of the translation train step: AdamW vs SAM vs VaSSO, tokens per second.

All three share the model, its initial weights, one synthetic token batch and the dropout
key; each is jitted with params and optimizer state donated. Timing follows
`experiments.benchmarks.measure`: warm-up (compilation) excluded, variants interleaved in
rotated order, medians over rounds, ratios taken within a round.
"""

import jax
import numpy as np

from experiments.benchmarks import measure
from experiments.translation import data, steps
from experiments.translation import model as model_lib

METHODS = ('none', 'sam', 'vasso')


def synthetic_batch(vocab_size: int, max_tokens: int, length: int, seed: int = 0):
    """A `data.make_batch` batch of random sentences filling ``max_tokens // length`` rows."""
    rng = np.random.default_rng(seed)
    rows = max_tokens // length
    lens = rng.integers(length // 2, length, size=(rows, 2))
    src = [np.array([*rng.integers(4, vocab_size, a - 1), 3], np.int32) for a, _ in lens]
    tgt = [np.array([*rng.integers(4, vocab_size, b - 1), 3], np.int32) for _, b in lens]
    return data.make_batch(src, tgt, np.arange(rows), length)


def step_time(
    config: model_lib.TransformerConfig | None = None,
    *,
    max_tokens: int = 2048,
    length: int = 32,
    rounds: int = 7,
    steps_per_round: int = 3,
    methods=METHODS,
) -> dict:
    """Times ``steps_per_round`` train steps per variant per round.

    Args:
      config: the model; default a small 3+3-layer, d_model 128 Transformer, 8k vocab.
      max_tokens, length: the batch is ``max_tokens // length`` rows of ``length`` tokens.
      rounds: interleaved timing rounds after one warm-up round.
      steps_per_round: steps per variant per round.
      methods: the variants, named as in `steps.make_optimizer`.

    Returns:
      ``{'seconds_per_step': {m: median}, 'tokens_per_second': {m: ...},
      'ratio_to_adamw': {m: median of per-round ratios}, 'tokens_per_batch': int}``.
    """
    config = config or model_lib.tiny(8000, d_model=128, ffn_dim=512, num_heads=4,
                                      encoder_layers=3, decoder_layers=3, dropout=0.3)
    graphdef, params, rest = steps.init_model(config, seed=0)
    batch = jax.device_put(synthetic_batch(config.vocab_size, max_tokens, length))
    tokens = int((batch['tgt_out'] != 0).sum())
    key = steps.dropout_key(0, 0)
    runners = {}
    for method in methods:
        tx = steps.make_optimizer(method, rho=0.05)
        step = jax.jit(steps.make_train_step(graphdef, tx), donate_argnums=(0, 2))
        state = [jax.tree.map(lambda x: x.copy(), params), tx.init(params)]

        def run(step=step, state=state):
            for _ in range(steps_per_round):
                state[0], state[1], metrics = step(state[0], rest, state[1], batch, key)
            jax.block_until_ready(metrics)

        run()  # warm-up: compiles
        runners[method] = run
    times = measure.interleaved_rounds(runners, rounds)
    per_step = {m: float(np.median(t)) / steps_per_round for m, t in times.items()}
    return {
        'seconds_per_step': per_step,
        'tokens_per_second': {m: tokens / s for m, s in per_step.items()},
        'ratio_to_adamw': {m: measure.median_ratio(times[m], times['none']) for m in times},
        'tokens_per_batch': tokens,
    }


if __name__ == '__main__':
    print(step_time())
