"""A joint SentencePiece vocabulary for both languages, trained once and cached on disk.

One vocabulary for source and target lets the model share one embedding matrix between
encoder, decoder and output layer (fairseq's ``--share-all-embeddings``). It is trained on
the training side only, written atomically beside the data as ``spm_<key>_<size>.model``
and reused when present, so a resumed or repeated run tokenises exactly as the first did.

Ids: 0 is padding, 1 unknown, 2 begin-of-sentence (the decoder's first input), 3
end-of-sentence (appended to every source and target).
"""

import io
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD, UNK, BOS, EOS = 0, 1, 2, 3
# Sentences SentencePiece samples to learn the vocabulary: plenty for 10k pieces, and keeps
# training to a minute or two even on WMT-sized corpora.
_MAX_TRAIN_SENTENCES = 2_000_000


class Tokenizer:
    """Encodes text to int32 ids ending in EOS, and decodes ids (up to EOS) back to text."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto  # the serialized SentencePiece model
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's piece ids with EOS appended, as int32 arrays."""
        return [np.asarray([*ids, EOS], np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids) -> str:
        """Detokenised text of ``ids``, read up to the first EOS (padding and BOS skipped)."""
        ids = np.asarray(ids).reshape(-1).tolist()
        if EOS in ids:
            ids = ids[:ids.index(EOS)]
        return self._sp.decode([i for i in ids if i not in (PAD, BOS)])


def vocab_path(cache_dir: str | os.PathLike, key: str, vocab_size: int) -> str:
    """Where the vocabulary of ``key`` (a dataset and language pair) with ``vocab_size`` lives."""
    safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', key)
    return os.path.join(os.fspath(cache_dir), f'spm_{safe}_{vocab_size}.model')


def train(texts: Iterable[str], vocab_size: int, *, seed: int = 0, num_threads: int = 1) -> bytes:
    """Trains a unigram SentencePiece model on ``texts`` and returns its serialized proto.

    The vocabulary size is a soft limit, so a corpus too small for ``vocab_size`` pieces
    (a test corpus) gets a smaller vocabulary instead of an error. With one thread the
    result depends on the texts and ``seed`` only, so processes that train at the same
    time (no cache yet) agree; more threads are faster but may differ in the last pieces.
    """
    model = io.BytesIO()
    # SentencePiece's sentence sampling draws from a process-wide generator.
    spm.set_random_generator_seed(seed + 1)  # 0 would mean "unseeded"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type='unigram',
        character_coverage=1.0,
        pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
        input_sentence_size=_MAX_TRAIN_SENTENCES,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        minloglevel=2,
    )
    return model.getvalue()


def load_or_train(
    cache_dir: str | os.PathLike, key: str, vocab_size: int, texts_fn, *, seed: int = 0,
    num_threads: int = 1,
) -> Tokenizer:
    """The cached vocabulary of ``key`` if present, else one trained on ``texts_fn()`` and cached.

    Args:
      cache_dir: directory holding the vocabularies (created if missing).
      key: names the corpus, e.g. ``'ted_multi_translate_de-en'``.
      vocab_size: number of pieces (a soft limit, see `train`).
      texts_fn: called only when training is needed; returns the training texts of both
        languages.
      seed: SentencePiece's sampling seed.
      num_threads: SentencePiece's training threads (see `train`).

    Returns:
      The `Tokenizer`.
    """
    path = vocab_path(cache_dir, key, vocab_size)
    if os.path.exists(path):
        with open(path, 'rb') as f:
            return Tokenizer(f.read())
    proto = train(texts_fn(), vocab_size, seed=seed, num_threads=num_threads)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Atomic: a run killed mid-write leaves no half file for the next run to trust.
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        f.write(proto)
    os.replace(tmp, path)
    return Tokenizer(proto)
