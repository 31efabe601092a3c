"""Parallel text through `tfds.data_source`, tokenised, filtered and batched by token budget.

The pipeline is a few pure functions a task calls in order::

    pairs = load_pairs('ted_multi_translate', 'train', data_dir)      # [(de, en), ...]
    tok = tokenizer.load_or_train(cache_dir, key, 10_000, lambda: texts(pairs))
    src, tgt = encode_pairs(tok, pairs)
    keep = filter_by_length(src, tgt, max_source_positions, max_target_positions)
    src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    plan = make_plan(src, tgt, max_tokens=4096)
    batch = make_batch(src, tgt, *plan.batch(step, seed))     # any step, in any order

Shapes. Every example goes to the smallest of a few fixed bucket lengths L that holds its
source and its target (EOS included); a bucket's batches are ``max_tokens // L`` rows of
length L, so one run sees only ``len(plan.buckets)`` batch shapes, and a jitted step compiles
once per bucket. That is fairseq's ``--max-tokens`` budget (rows x padded length <= budget)
with fixed shapes; the buckets grow by about 1.25x, which keeps padding near 10%.

Order. ``plan.batch(step, seed)`` is a pure function of the step: epoch ``step //
batches_per_epoch`` shuffles each bucket and then the batches with a key derived from
``(seed, epoch)``, so a resumed run continues the same sequence from its step, with no
iterator state to save.
"""

import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np

from experiments.runtime import tfds_source
from experiments.translation import tokenizer as tokenizer_lib

DATASETS = ('ted_multi_translate', 'wmt14_translate/de-en')
# Missing translations in ted_multi_translate (the talk was not translated to a language).
_MISSING = ('__NULL__', '_ _ NULL _ _')


def _text(value) -> str:
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def ted_pair(example, src: str, tgt: str) -> tuple[str, str] | None:
    """The (src, tgt) texts of one ted_multi_translate example; None if either is missing.

    ted_multi_translate stores each talk segment in all its languages at once: parallel
    lists ``translations['language']`` and ``translations['translation']``.
    """
    translations = example['translations']
    by_language = {
        _text(lang): _text(text)
        for lang, text in zip(translations['language'], translations['translation'])
    }
    pair = by_language.get(src), by_language.get(tgt)
    if any(t is None or not t.strip() or t.strip() in _MISSING for t in pair):
        return None
    return pair


def load_pairs(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    src: str = 'de',
    tgt: str = 'en',
) -> list[tuple[str, str]]:
    """All (source, target) sentence pairs of a prepared split, read with `tfds.data_source`.

    Args:
      name: ``'ted_multi_translate'`` (IWSLT-like TED talks, the default) or
        ``'wmt14_translate/de-en'``.
      split: ``'train'``, ``'validation'`` or ``'test'``.
      data_dir: TFDS data directory; None means TFDS's default.
      src, tgt: language codes; wmt14 has ``'de'`` and ``'en'`` only.

    Returns:
      The pairs in the split's order; ted examples lacking either language are skipped.

    Raises:
      experiments.runtime.tfds_source.DatasetNotFoundError: the dataset is not prepared as
        ArrayRecord under ``data_dir``; its message names ``--config.data_dir``.
    """
    if name not in DATASETS:
        raise ValueError(f'Unknown translation dataset {name!r}; choose one of {DATASETS}.')
    if name.startswith('wmt14'):
        # Registers the wmt14 builders; importing it needs no TensorFlow.
        from tensorflow_datasets.translate import wmt14  # noqa: F401
    source = tfds_source.open_split(name, split, data_dir)
    pairs = []
    for example in tfds_source.read_examples(source, range(len(source))):
        if name == 'ted_multi_translate':
            pair = ted_pair(example, src, tgt)
        else:
            pair = _text(example[src]), _text(example[tgt])
        if pair is not None:
            pairs.append(pair)
    return pairs


def texts(pairs: Sequence[tuple[str, str]]):
    """Both sides of ``pairs``, one text at a time (a joint vocabulary's training corpus)."""
    for source, target in pairs:
        yield source
        yield target


def encode_pairs(tok: tokenizer_lib.Tokenizer, pairs: Sequence[tuple[str, str]]):
    """The pairs' ids as two lists of int32 arrays, each ending in EOS."""
    return tok.encode([s for s, _ in pairs]), tok.encode([t for _, t in pairs])


def filter_by_length(
    src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], max_source: int, max_target: int
) -> np.ndarray:
    """Indices of the pairs fairseq keeps: ``len(src) <= max_source``, ``len(tgt) <= max_target``.

    Lengths count the EOS, as fairseq's do; empty sentences (EOS alone) are dropped too.
    """
    src_len, tgt_len = lengths(src), lengths(tgt)
    keep = (src_len <= max_source) & (tgt_len <= max_target) & (src_len > 1) & (tgt_len > 1)
    return np.flatnonzero(keep)


def lengths(seqs: Sequence[np.ndarray]) -> np.ndarray:
    return np.fromiter((len(s) for s in seqs), np.int64, count=len(seqs))


def bucket_lengths(max_length: int, *, smallest: int = 8, growth: float = 1.25) -> tuple:
    """Padded lengths: multiples of 8 growing by ``growth``, the last ``>= max_length``."""
    buckets = [smallest]
    while buckets[-1] < max_length:
        buckets.append(max(buckets[-1] + 8, int(buckets[-1] * growth) // 8 * 8))
    return tuple(buckets)


# eq=False: hashed by identity, so an epoch's batches can be cached per plan.
@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Which examples go together: per bucket length, the example indices and the batch rows.

    Attributes:
      buckets: the padded lengths in use, ascending.
      members: per bucket, the indices of its examples.
      rows: per bucket, its batch size ``max_tokens // length``.
    """

    buckets: tuple
    members: tuple
    rows: tuple

    @property
    def batches_per_epoch(self) -> int:
        return sum(-(-len(m) // r) for m, r in zip(self.members, self.rows))

    def batch(self, step: int, seed: int) -> tuple[np.ndarray, int]:
        """The example indices (-1 for an empty filler row) and padded length of batch ``step``."""
        epoch, i = divmod(int(step), self.batches_per_epoch)
        return _epoch_batches(self, seed, epoch)[i]

    def ordered_batches(self):
        """Every example once, in bucket order, without shuffling: for evaluation."""
        for length, members, rows in zip(self.buckets, self.members, self.rows):
            for start in range(0, len(members), rows):
                yield _fill(members[start:start + rows], rows), length


def _fill(indices: np.ndarray, rows: int) -> np.ndarray:
    # A bucket's last batch is topped up with empty rows: same shape, no weight in the loss.
    return np.concatenate([indices, np.full(rows - len(indices), -1, np.int64)])


@functools.lru_cache(maxsize=2)
def _epoch_batches(plan: Plan, seed: int, epoch: int) -> list:
    rng = np.random.default_rng([seed, epoch])
    batches = []
    for length, members, rows in zip(plan.buckets, plan.members, plan.rows):
        shuffled = rng.permutation(members)
        batches += [
            (_fill(shuffled[s:s + rows], rows), length) for s in range(0, len(shuffled), rows)
        ]
    return [batches[j] for j in rng.permutation(len(batches))]


def make_plan(
    src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], *, max_tokens: int, buckets=None,
    row_multiple: int = 1,
) -> Plan:
    """Groups the examples by bucket length, with ``max_tokens // length`` rows per batch.

    Args:
      src, tgt: token ids of the (filtered) examples, EOS included.
      max_tokens: the token budget of a batch (fairseq's ``--max-tokens``): rows x padded
        length never exceed it.
      buckets: ascending padded lengths; default `bucket_lengths` of the longest example.
      row_multiple: each bucket's rows are rounded down to a multiple of this (the number of
        data shards, so that a batch splits evenly over the devices).

    Returns:
      The `Plan`; buckets that receive no example are left out.
    """
    # The decoder reads BOS + target, so the padded length must hold the target's tokens.
    need = np.maximum(lengths(src), lengths(tgt))
    if buckets is None:
        buckets = bucket_lengths(int(need.max()))
    buckets = np.asarray(buckets)
    if need.max() > buckets[-1]:
        raise ValueError(
            f'An example has {need.max()} tokens, more than the largest bucket {buckets[-1]};'
            ' filter by length first (filter_by_length).'
        )
    if max_tokens < buckets[-1] * row_multiple:
        raise ValueError(f'max_tokens={max_tokens} must be at least the largest bucket length'
                         f' {buckets[-1]} times {row_multiple} rows; raise max_tokens or lower'
                         ' the length limits.')
    which = np.searchsorted(buckets, need)
    kept = [(int(b), np.flatnonzero(which == k)) for k, b in enumerate(buckets)]
    kept = [(b, m) for b, m in kept if len(m)]
    return Plan(
        buckets=tuple(b for b, _ in kept),
        members=tuple(m for _, m in kept),
        rows=tuple(max_tokens // b // row_multiple * row_multiple for b, _ in kept),
    )


def make_batch(
    src: Sequence[np.ndarray], tgt: Sequence[np.ndarray], indices: np.ndarray, length: int
) -> dict[str, np.ndarray]:
    """Pads the examples ``indices`` (-1: an empty row) into a batch of ``length`` columns.

    Returns:
      ``'src'`` the source ids, ``'tgt_in'`` BOS + target without its EOS (the decoder's
      input), ``'tgt_out'`` the target with EOS (what it predicts); all int32
      (rows, length), padded with `tokenizer.PAD`.
    """
    rows = len(indices)
    batch = {k: np.full((rows, length), tokenizer_lib.PAD, np.int32)
             for k in ('src', 'tgt_in', 'tgt_out')}
    for r, i in enumerate(indices):
        if i < 0:
            continue
        s, t = src[i], tgt[i]
        batch['src'][r, :len(s)] = s
        batch['tgt_out'][r, :len(t)] = t
        batch['tgt_in'][r, 0] = tokenizer_lib.BOS
        batch['tgt_in'][r, 1:len(t)] = t[:-1]
    return batch
