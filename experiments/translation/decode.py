"""Greedy and beam search with the model's KV cache, as `jax.lax.while_loop`s.

Both follow fairseq's generator: the first token cannot be EOS (``min_len=1``), padding and
BOS are never produced, the last of ``max_len`` steps is forced to EOS, and a sentence
stops when it is finished (greedy: produced EOS; beam: ``beam_size`` hypotheses ended). A
beam hypothesis that ends is scored ``sum log p / length ** length_penalty`` (``length``
counts its EOS). Each function is jitted once per ``(batch shape, max_len, beam_size)``:
with the bucketed batches of `data`, once per bucket.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.translation import data
from experiments.translation import tokenizer as tokenizer_lib

PAD, BOS, EOS = tokenizer_lib.PAD, tokenizer_lib.BOS, tokenizer_lib.EOS


def _log_probs(logits, t, max_len):
    """Log-probabilities with fairseq's constraints at step ``t`` applied (banned: -inf)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    vocab = jnp.arange(logp.shape[-1])
    banned = (vocab == PAD) | (vocab == BOS) | ((vocab == EOS) & (t == 0))
    banned = banned | ((vocab != EOS) & (t == max_len - 1))
    return jnp.where(banned, -jnp.inf, logp)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_len'))
def greedy_search(graphdef, params, rest, src, *, max_len: int):
    """Greedy decoding of source ids ``src`` (B, S).

    Returns:
      int32 (B, max_len): each row's tokens up to and including its EOS, then PAD.
    """
    model = nnx.merge(graphdef, params, rest)
    batch = src.shape[0]

    def cond(state):
        t, _, _, _, done = state
        return (t < max_len) & ~done.all()

    def body(state):
        t, prev, cache, out, done = state
        logits, cache = model.decode_step(prev, t, cache)
        token = jnp.argmax(_log_probs(logits, t, max_len), axis=-1).astype(jnp.int32)
        token = jnp.where(done, PAD, token)
        out = out.at[:, t].set(token)
        return t + 1, token, cache, out, done | (token == EOS)

    state = (0, jnp.full((batch,), BOS, jnp.int32), model.init_cache(src, max_len),
             jnp.full((batch, max_len), PAD, jnp.int32), jnp.zeros((batch,), bool))
    return jax.lax.while_loop(cond, body, state)[3]


def _repeat_cache(cache, k):
    # Every source sentence's cache repeated for its k beams: row b * k + j is beam j of b.
    return cache._replace(**{
        name: jnp.repeat(getattr(cache, name), k, axis=0 if name == 'src_mask' else 1)
        for name in cache._fields
    })


def _gather_cache(cache, rows):
    return cache._replace(**{
        name: jnp.take(getattr(cache, name), rows, axis=0 if name == 'src_mask' else 1)
        for name in cache._fields
    })


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_len', 'beam_size'))
def beam_search(graphdef, params, rest, src, *, max_len: int, beam_size: int = 5,
                length_penalty: float = 1.0):
    """Beam search of source ids ``src`` (B, S), fairseq's way.

    Each step extends every live hypothesis by every token, keeps the ``2 * beam_size``
    best by total log-probability, ends those among the first ``beam_size`` that are EOS
    (scored ``total / length ** length_penalty``) and continues with the best
    ``beam_size`` that are not. A sentence is done once ``beam_size`` hypotheses have ended.

    Returns:
      ``(tokens, scores)``: int32 (B, max_len), the best ended hypothesis of each sentence
      (up to and including EOS, then PAD), and its float32 (B,) normalised score.
    """
    model = nnx.merge(graphdef, params, rest)
    b, k = src.shape[0], beam_size
    rank = jnp.arange(2 * k)

    def cond(state):
        t, *_, n_ended = state
        return (t < max_len) & (n_ended < k).any()

    def body(state):
        t, seqs, logp, last, cache, ended, ended_score, n_ended = state
        logits, cache = model.decode_step(last.reshape(-1), t, cache)
        vocab = logits.shape[-1]
        scores = logp[..., None] + _log_probs(logits, t, max_len).reshape(b, k, vocab)
        top, index = jax.lax.top_k(scores.reshape(b, k * vocab), 2 * k)
        parent, token = index // vocab, (index % vocab).astype(jnp.int32)
        cand = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, t].set(token)

        # Ended: EOS among the first k candidates of a sentence not yet done.
        ends = (token == EOS) & (rank < k) & (n_ended < k)[:, None] & jnp.isfinite(top)
        end_score = jnp.where(ends, top / (t + 1.0) ** length_penalty, -jnp.inf)
        pool_score = jnp.concatenate([ended_score, end_score], axis=1)
        ended_score, pick = jax.lax.top_k(pool_score, k)
        ended = jnp.take_along_axis(jnp.concatenate([ended, cand], axis=1), pick[..., None],
                                    axis=1)
        n_ended = n_ended + ends.sum(axis=1)

        # Live: the best k candidates that did not end.
        logp, keep = jax.lax.top_k(jnp.where(token == EOS, -jnp.inf, top), k)
        seqs = jnp.take_along_axis(cand, keep[..., None], axis=1)
        last = jnp.take_along_axis(token, keep, axis=1)
        rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(parent, keep, axis=1))
        return (t + 1, seqs, logp, last, _gather_cache(cache, rows.reshape(-1)), ended,
                ended_score, n_ended)

    # Only beam 0 is live at first, so the k beams do not start as k copies of one.
    logp = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf) * jnp.ones((b, 1))
    empty = jnp.full((b, k, max_len), PAD, jnp.int32)
    state = (0, empty, logp, jnp.full((b, k), BOS, jnp.int32),
             _repeat_cache(model.init_cache(src, max_len), k), empty,
             jnp.full((b, k), -jnp.inf), jnp.zeros((b,), jnp.int32))
    state = jax.lax.while_loop(cond, body, state)
    return state[5][:, 0], state[6][:, 0]


def translate(graphdef, params, rest, src, *, max_tokens: int, beam_size: int = 5,
              length_penalty: float = 1.0, max_len_a: float = 1.2, max_len_b: int = 10,
              row_multiple: int = 1, buckets=None, put=jnp.asarray, fetch=jax.device_get):
    """Translates every source sentence ``src`` (a list of id arrays ending in EOS).

    The sentences are bucketed by length as in training (`data.make_plan`) and each bucket
    of padded length L decodes up to ``int(max_len_a * L) + max_len_b`` tokens, so the
    search compiles once per bucket. ``beam_size=1`` decodes greedily. ``put`` places a
    batch of source ids (e.g. sharded over the devices, with ``row_multiple`` the device
    count; ``buckets`` as for `data.make_plan`) and ``fetch`` brings the output tokens back
    to the host.

    Returns:
      The output ids of each sentence, in the order of ``src``: int32 arrays ending in EOS.
    """
    plan = data.make_plan(src, src, max_tokens=max_tokens, row_multiple=row_multiple,
                          buckets=buckets)
    outputs = [None] * len(src)
    for indices, length in plan.ordered_batches():
        batch = put(data.make_batch(src, src, indices, length)['src'])
        max_len = int(max_len_a * length) + max_len_b
        if beam_size == 1:
            tokens = greedy_search(graphdef, params, rest, batch, max_len=max_len)
        else:
            tokens, _ = beam_search(graphdef, params, rest, batch, max_len=max_len,
                                    beam_size=beam_size, length_penalty=length_penalty)
        for i, row in zip(indices, fetch(tokens)):
            if i >= 0:
                outputs[i] = row[:list(row).index(EOS) + 1]
    return outputs
