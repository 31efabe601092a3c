"""Translation data: tfds reading, filtering, token-budget buckets, SentencePiece caching."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments.runtime import tfds_source
from experiments.translation import data
from experiments.translation import tokenizer as tokenizer_lib
from tests.experiments.conftest import NUM_MOCK


def _synthetic(n, seed=0):
    """Token-id pairs with a long-tailed length distribution like real sentences."""
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(3.0, 0.6, size=(n, 2)), 1, 200).astype(int)
    return ([np.array([*rng.integers(4, 50, a), 3], np.int32) for a, _ in lens],
            [np.array([*rng.integers(4, 50, b), 3], np.int32) for _, b in lens])


def test_filter_by_length_keeps_what_fairseq_keeps():
    src = [np.array([5, 3]), np.array([3]), np.array([5, 6, 7, 3]), np.array([5, 6, 3])]
    tgt = [np.array([5, 3]), np.array([5, 3]), np.array([5, 3]), np.array([5, 6, 7, 8, 3])]
    # 1: empty source; 2: source too long (4 > 3); 3: target too long (5 > 4).
    np.testing.assert_array_equal(data.filter_by_length(src, tgt, 3, 4), [0])
    np.testing.assert_array_equal(data.filter_by_length(src, tgt, 4, 5), [0, 2, 3])


def test_plan_respects_the_token_budget_with_few_shapes_and_little_padding():
    src, tgt = _synthetic(20_000)
    keep = data.filter_by_length(src, tgt, 128, 128)
    src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    plan = data.make_plan(src, tgt, max_tokens=4096)
    allowed = data.bucket_lengths(128)
    assert set(plan.buckets) <= set(allowed) and len(plan.buckets) <= 12
    seen, real, padded, shapes = [], 0, 0, set()
    for step in range(plan.batches_per_epoch):
        indices, length = plan.batch(step, seed=1)
        batch = data.make_batch(src, tgt, indices, length)
        shapes.add(batch['src'].shape)
        assert batch['src'].size <= 4096
        rows = indices[indices >= 0]
        seen += rows.tolist()
        real += sum(max(len(src[i]), len(tgt[i])) for i in rows)
        padded += batch['src'].size
    assert len(shapes) == len(plan.buckets)  # one compilation per bucket
    assert sorted(seen) == list(range(len(src)))  # an epoch is every example once
    # Padding (vs the longer side of each pair), the last part-empty batch of each bucket
    # included: about 13% here, 10.5% without those.
    assert 1 - real / padded < 0.15, 1 - real / padded


def test_batch_order_is_a_pure_function_of_step_and_seed():
    src, tgt = _synthetic(500)
    plan = data.make_plan(src, tgt, max_tokens=1024)
    fresh = data.make_plan(src, tgt, max_tokens=1024)  # a resumed run rebuilds the plan
    n = plan.batches_per_epoch
    for step in (0, 5, n - 1, n, 3 * n + 2):
        np.testing.assert_array_equal(plan.batch(step, 0)[0], fresh.batch(step, 0)[0])
    epoch0 = [plan.batch(s, 0)[0] for s in range(n)]
    epoch1 = [plan.batch(n + s, 0)[0] for s in range(n)]
    assert any(not np.array_equal(a, b) for a, b in zip(epoch0, epoch1))
    assert not np.array_equal(plan.batch(0, 0)[0], plan.batch(0, 1)[0])


def test_make_batch_shifts_the_target_and_pads():
    src, tgt = [np.array([7, 8, 3])], [np.array([9, 10, 11, 3])]
    batch = data.make_batch(src, tgt, np.array([0, -1]), 6)
    np.testing.assert_array_equal(batch['src'], [[7, 8, 3, 0, 0, 0], [0] * 6])
    np.testing.assert_array_equal(batch['tgt_in'], [[2, 9, 10, 11, 0, 0], [0] * 6])
    np.testing.assert_array_equal(batch['tgt_out'], [[9, 10, 11, 3, 0, 0], [0] * 6])


def test_plan_errors_name_the_fix():
    src, tgt = [np.arange(4, 40)], [np.arange(4, 10)]
    with pytest.raises(ValueError, match='filter_by_length'):
        data.make_plan(src, tgt, max_tokens=4096, buckets=(8, 16))
    with pytest.raises(ValueError, match='raise max_tokens'):
        data.make_plan(src, tgt, max_tokens=16, buckets=(8, 40))


SENTENCES = [
    'the cat sat on the mat', 'die katze sass auf der matte', 'a dog runs in the park',
    'ein hund rennt im park', 'we like green tea', 'wir moegen gruenen tee',
] * 20


def test_sentencepiece_trains_caches_and_reuses(tmp_path):
    tok = tokenizer_lib.load_or_train(tmp_path, 'toy_de-en', 60, lambda: iter(SENTENCES))
    path = tokenizer_lib.vocab_path(tmp_path, 'toy_de-en', 60)
    assert os.path.exists(path)
    ids = tok.encode(['the cat sat on the mat', 'wir moegen tee'])
    assert all(row[-1] == tokenizer_lib.EOS and (row[:-1] > 3).all() for row in ids)
    assert tok.decode(np.concatenate([ids[0], [0, 0]])) == 'the cat sat on the mat'

    def must_not_train():
        raise AssertionError('the cached vocabulary should have been reused')

    again = tokenizer_lib.load_or_train(tmp_path, 'toy_de-en', 60, must_not_train)
    assert [r.tolist() for r in again.encode(['wir moegen tee'])] == [ids[1].tolist()]
    assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]


def test_load_pairs_wmt14_on_mock_tfds_then_vocabulary_and_batches(mock_tfds, tmp_path):
    pairs = data.load_pairs('wmt14_translate/de-en', 'train')
    assert len(pairs) == NUM_MOCK and all(isinstance(t, str) for p in pairs for t in p)
    tok = tokenizer_lib.load_or_train(tmp_path, 'wmt14_de-en', 40, lambda: data.texts(pairs))
    src, tgt = data.encode_pairs(tok, pairs)
    assert tok.decode(src[0]) == ' '.join(pairs[0][0].split())
    plan = data.make_plan(src, tgt, max_tokens=256)
    batch = data.make_batch(src, tgt, *plan.batch(0, seed=0))
    assert batch['src'].shape[1] in plan.buckets


def test_ted_pairs_are_extracted_from_the_translation_lists():
    def example(langs, texts):
        return {'translations': {'language': np.array(langs), 'translation': np.array(texts)}}

    examples = [
        example(['de', 'en', 'fr'], ['hallo welt', 'hello world', 'bonjour']),
        example([b'en', b'fr'], [b'only english', b'que francais']),  # no German: skipped
        example(['de', 'en'], ['__NULL__', 'missing german']),
    ]

    def as_data_source(self, split, **kwargs):
        del self, split, kwargs
        return _ListSource(examples)

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        assert data.load_pairs('ted_multi_translate', 'train') == [('hallo welt', 'hello world')]
        assert data.load_pairs('ted_multi_translate', 'train', src='fr', tgt='en') == [
            ('bonjour', 'hello world'), ('que francais', 'only english')]


class _ListSource(list):
    def __getitems__(self, keys):
        return [self[k] for k in keys]


def test_unprepared_dataset_is_a_one_line_error_naming_data_dir(tmp_path):
    with pytest.raises(tfds_source.DatasetNotFoundError, match='--config.data_dir') as info:
        data.load_pairs('ted_multi_translate', 'train', data_dir=tmp_path)
    assert '\n' not in str(info.value) and 'ted_multi_translate' in str(info.value)
    with pytest.raises(ValueError, match='choose one of'):
        data.load_pairs('iwslt14', 'train')


def test_sentencepiece_training_is_deterministic():
    # Processes that find no cached vocabulary train their own; they must agree.
    assert tokenizer_lib.train(iter(SENTENCES), 60) == tokenizer_lib.train(iter(SENTENCES), 60)
