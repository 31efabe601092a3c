"""An encoder-decoder Transformer in Flax NNX, sized like fairseq's ``transformer_iwslt_de_en``.

Vaswani et al.'s architecture as fairseq builds it: sinusoidal positions added to embeddings
scaled by sqrt(d_model), post-norm residual blocks (``normalize_before=False``; pre-norm on
request, then with a final LayerNorm), ReLU feed-forward, one embedding matrix shared by
encoder, decoder and output layer (a joint vocabulary), dropout on embeddings and block
outputs (attention and activation dropout 0, fairseq's defaults for this architecture).

Randomness is explicit: every call takes ``key`` (a PRNG key for dropout, or None for no
dropout), and the model holds parameters only. So a loss of ``(params, batch, key)`` is a
pure function, and a sharpness-aware second pass with the same key sees the same dropout
mask.

Incremental decoding keeps its cache as explicit arrays (`Cache`), so a decoder step is a
pure function of ``(params, cache, tokens, t)`` that runs inside `jax.lax.while_loop`.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.translation import tokenizer as tokenizer_lib

_NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and regularisation; the defaults are fairseq's ``transformer_iwslt_de_en``."""

    vocab_size: int
    d_model: int = 512
    ffn_dim: int = 1024
    num_heads: int = 4
    encoder_layers: int = 6
    decoder_layers: int = 6
    dropout: float = 0.3
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    normalize_before: bool = False
    pad_id: int = tokenizer_lib.PAD


def iwslt_de_en(vocab_size: int, **overrides) -> TransformerConfig:
    """fairseq's ``transformer_iwslt_de_en``: 6+6 layers, d_model 512, FFN 1024, 4 heads."""
    return TransformerConfig(vocab_size, **overrides)


def tiny(vocab_size: int, **overrides) -> TransformerConfig:
    """A 2+2-layer, d_model 32 model for tests and benchmarks on CPU."""
    sizes = dict(d_model=32, ffn_dim=64, num_heads=4, encoder_layers=2, decoder_layers=2,
                 dropout=0.1)
    return TransformerConfig(vocab_size, **{**sizes, **overrides})


def _keys(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def dropout(x, rate: float, key):
    """Inverted dropout; the identity when ``key`` is None or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def sinusoidal(positions, dim: int):
    """fairseq's sinusoidal embedding of integer ``positions``: [sin | cos], shape (..., dim)."""
    half = dim // 2
    freq = jnp.exp(jnp.arange(half) * -(math.log(10000.0) / (half - 1)))
    angles = positions[..., None].astype(jnp.float32) * freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Attention(nnx.Module):
    """Multi-head attention, ``softmax(q k^T / sqrt(d_head)) v``, with separate key/value input."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, init = config.d_model, nnx.initializers.xavier_uniform()
        self.num_heads, self.rate = config.num_heads, config.attention_dropout
        self.query, self.key, self.value, self.out = (
            nnx.Linear(d, d, kernel_init=init, rngs=rngs) for _ in range(4))

    def _heads(self, x):  # (B, T, d) -> (B, H, T, d / H)
        b, t, d = x.shape
        return x.reshape(b, t, self.num_heads, d // self.num_heads).transpose(0, 2, 1, 3)

    def keys_values(self, x):
        """The keys and values of ``x``, split into heads: two (B, H, T, d / H) arrays."""
        return self._heads(self.key(x)), self._heads(self.value(x))

    def __call__(self, x, k, v, mask, key=None):
        """Attends from ``x`` (B, Q, d) to ``k``/``v``; ``mask`` broadcasts to (B, H, Q, K)."""
        q = self._heads(self.query(x))
        logits = jnp.einsum('bhqd,bhkd->bhqk', q, k) / math.sqrt(q.shape[-1])
        weights = jax.nn.softmax(jnp.where(mask, logits, _NEG_INF), axis=-1)
        weights = dropout(weights, self.rate, key)
        b, _, t, _ = q.shape
        y = jnp.einsum('bhqk,bhkd->bhqd', weights, v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        return self.out(y)


class _Block(nnx.Module):
    """Residual wiring shared by encoder and decoder layers (post- or pre-norm)."""

    def _init_block(self, config, n_sublayers, rngs):
        d = config.d_model
        self.pre, self.rate, self.act_rate = (
            config.normalize_before, config.dropout, config.activation_dropout)
        self.norms = nnx.List([nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
                               for _ in range(n_sublayers)])
        init = nnx.initializers.xavier_uniform()
        self.fc1 = nnx.Linear(d, config.ffn_dim, kernel_init=init, rngs=rngs)
        self.fc2 = nnx.Linear(config.ffn_dim, d, kernel_init=init, rngs=rngs)

    def _residual(self, i, x, fn, key):
        if self.pre:
            return x + dropout(fn(self.norms[i](x)), self.rate, key)
        return self.norms[i](x + dropout(fn(x), self.rate, key))

    def _ffn(self, key):
        return lambda x: self.fc2(dropout(jax.nn.relu(self.fc1(x)), self.act_rate, key))


class EncoderLayer(_Block):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.attention = Attention(config, rngs=rngs)
        self._init_block(config, 2, rngs)

    def __call__(self, x, mask, key=None):
        k = _keys(key, 4)
        x = self._residual(0, x, lambda y: self.attention(y, *self.attention.keys_values(y),
                                                           mask, k[0]), k[1])
        return self._residual(1, x, self._ffn(k[2]), k[3])


class DecoderLayer(_Block):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.self_attention = Attention(config, rngs=rngs)
        self.cross_attention = Attention(config, rngs=rngs)
        self._init_block(config, 3, rngs)

    def __call__(self, x, self_kv, self_mask, cross_kv, cross_mask, key=None):
        """One layer; ``self_kv`` maps the layer's (normalised) input to its keys/values."""
        k = _keys(key, 6)
        x = self._residual(0, x, lambda y: self.self_attention(y, *self_kv(y), self_mask, k[0]),
                           k[1])
        x = self._residual(1, x, lambda y: self.cross_attention(y, *cross_kv, cross_mask, k[2]),
                           k[3])
        return self._residual(2, x, self._ffn(k[4]), k[5])


class Cache(NamedTuple):
    """Incremental decoding state: per decoder layer, keys/values so far and of the source.

    ``self_k``/``self_v``: (layers, B, H, max_len, d / H), filled up to the current step;
    ``cross_k``/``cross_v``: (layers, B, H, S, d / H); ``src_mask``: (B, 1, 1, S) bool.
    """

    self_k: jax.Array
    self_v: jax.Array
    cross_k: jax.Array
    cross_v: jax.Array
    src_mask: jax.Array


class Transformer(nnx.Module):
    """Encoder-decoder Transformer with one shared embedding; see the module docstring.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> m = Transformer(tiny(vocab_size=20), rngs=nnx.Rngs(0))
      >>> src = jnp.array([[5, 6, 7, 3]]); tgt_in = jnp.array([[2, 7, 6, 5]])
      >>> m(src, tgt_in).shape
      (1, 4, 20)
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        d = config.d_model
        self.embed = nnx.Embed(config.vocab_size, d,
                               embedding_init=nnx.initializers.normal(d ** -0.5), rngs=rngs)
        self.encoder = nnx.List([EncoderLayer(config, rngs=rngs)
                                 for _ in range(config.encoder_layers)])
        self.decoder = nnx.List([DecoderLayer(config, rngs=rngs)
                                 for _ in range(config.decoder_layers)])
        if config.normalize_before:
            self.encoder_norm = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
            self.decoder_norm = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)

    def _embed(self, tokens, positions, key):
        x = self.embed(tokens) * math.sqrt(self.config.d_model)
        return dropout(x + sinusoidal(positions, self.config.d_model), self.config.dropout, key)

    def _final(self, x, name):
        return getattr(self, name)(x) if self.config.normalize_before else x

    def encode(self, src, *, key=None):
        """Encoder output (B, S, d) of source ids ``src`` (B, S)."""
        keys = _keys(key, 1 + len(self.encoder))
        mask = (src != self.config.pad_id)[:, None, None, :]
        x = self._embed(src, jnp.arange(src.shape[1]), keys[0])
        for layer, k in zip(self.encoder, keys[1:]):
            x = layer(x, mask, k)
        return self._final(x, 'encoder_norm')

    def decode(self, tgt_in, enc_out, src, *, key=None):
        """Next-token logits (B, T, vocab) for decoder inputs ``tgt_in`` (B, T), causally."""
        keys = _keys(key, 1 + len(self.decoder))
        t = tgt_in.shape[1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        src_mask = (src != self.config.pad_id)[:, None, None, :]
        x = self._embed(tgt_in, jnp.arange(t), keys[0])
        for layer, k in zip(self.decoder, keys[1:]):
            cross = layer.cross_attention.keys_values(enc_out)
            x = layer(x, layer.self_attention.keys_values, causal, cross, src_mask, k)
        return self.embed.attend(self._final(x, 'decoder_norm'))

    def __call__(self, src, tgt_in, *, key=None):
        """Teacher-forced logits (B, T, vocab); dropout on when ``key`` is a PRNG key."""
        k_enc, k_dec = _keys(key, 2)
        return self.decode(tgt_in, self.encode(src, key=k_enc), src, key=k_dec)

    def init_cache(self, src, max_len: int) -> Cache:
        """Encodes ``src`` (B, S) (no dropout) and returns an empty cache for ``max_len`` steps."""
        enc_out = self.encode(src)
        cross = [layer.cross_attention.keys_values(enc_out) for layer in self.decoder]
        cross_k, cross_v = (jnp.stack(x) for x in zip(*cross))
        b, h, _, dh = cross_k.shape[1:]
        empty = jnp.zeros((len(self.decoder), b, h, max_len, dh), cross_k.dtype)
        return Cache(empty, empty, cross_k, cross_v, (src != self.config.pad_id)[:, None, None])

    def decode_step(self, tokens, t, cache: Cache):
        """Logits (B, vocab) after decoder input ``tokens`` (B,) at position ``t``; new cache.

        Equal to ``decode`` on the whole prefix, but costs one position, not ``t + 1``.
        """
        max_len = cache.self_k.shape[3]
        visible = (jnp.arange(max_len) <= t)[None, None, None, :]
        x = self._embed(tokens[:, None], jnp.reshape(t, (1,)), None)
        new_k, new_v = [], []
        for i, layer in enumerate(self.decoder):

            def self_kv(y, i=i, layer=layer):
                k, v = layer.self_attention.keys_values(y)
                k = jax.lax.dynamic_update_slice_in_dim(cache.self_k[i], k, t, axis=2)
                v = jax.lax.dynamic_update_slice_in_dim(cache.self_v[i], v, t, axis=2)
                new_k.append(k)
                new_v.append(v)
                return k, v

            x = layer(x, self_kv, visible, (cache.cross_k[i], cache.cross_v[i]), cache.src_mask)
        logits = self.embed.attend(self._final(x, 'decoder_norm'))[:, 0]
        return logits, cache._replace(self_k=jnp.stack(new_k), self_v=jnp.stack(new_v))


def label_smoothed_loss(logits, targets, *, smoothing: float = 0.1,
                        pad_id: int = tokenizer_lib.PAD):
    """fairseq's label-smoothed cross entropy, summed over the non-padding targets.

    With ``p = softmax(logits)``, V classes and ``e = smoothing / (V - 1)``, per token

        loss = (1 - smoothing - e) * (-log p[y]) + e * sum_v (-log p[v]),

    i.e. cross entropy against ``1 - smoothing`` on the target and ``e`` on every class.

    Args:
      logits: (..., V) float.
      targets: (...) int, `pad_id` where there is no target.
      smoothing: the smoothing mass (fairseq's ``--label-smoothing``).
      pad_id: the ignored target id.

    Returns:
      ``(loss_sum, nll_sum, num_tokens)`` float32 scalars; ``nll_sum`` is the unsmoothed
      cross entropy (its mean gives the perplexity).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    smooth = -logp.sum(axis=-1)
    eps = smoothing / (logits.shape[-1] - 1)
    loss = (1.0 - smoothing - eps) * nll + eps * smooth
    weight = (targets != pad_id).astype(jnp.float32)
    return (loss * weight).sum(), (nll * weight).sum(), weight.sum()
