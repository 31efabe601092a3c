"""Tests of experiments.data: loading (TFDS mocked, and real ArrayRecord), noise, augmentation."""

import io
import os

import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import naming
from tensorflow_datasets.core import splits as splits_lib

from experiments.image_classification import data
from experiments.image_classification.data import augment, cifar, digits, noise
from experiments.runtime import tfds_source
from tests.experiments.conftest import NUM_MOCK

MEAN = np.array([0.3, 0.4, 0.5], np.float32)  # x / 255 never equals these: no zero pixel
STD = np.array([0.2, 0.25, 0.3], np.float32)
# Inside jit XLA may fuse the normalisation differently (a few float32 ulps); pixels move
# exactly, so comparisons allow that much and zeros (pads, holes) are checked exactly.
ATOL = 1e-5


# --------------------------------------------------------------------------- TFDS loading


@pytest.fixture(scope='module')
def prepared_cifar10(tmp_path_factory):
    """A real, tiny cifar10 prepared as ArrayRecord (no TensorFlow needed), and its data."""
    data_dir = tmp_path_factory.mktemp('tfds')
    builder = tfds.builder('cifar10', data_dir=data_dir, file_format='array_record')
    os.makedirs(builder.data_path)
    rng = np.random.default_rng(0)
    written, infos = {}, []
    for split, size in (('train', 23), ('test', 7)):
        images = rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size)
        template = naming.ShardedFileTemplate(
            data_dir=builder.data_path,
            dataset_name='cifar10',
            split=split,
            filetype_suffix='array_record',
        )
        path = template.sharded_filepath(shard_index=0, num_shards=1)
        writer = array_record_module.ArrayRecordWriter(os.fspath(path), 'group_size:1')
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            png = io.BytesIO()
            PIL.Image.fromarray(image).save(png, format='PNG')
            png.seek(0)  # an encoded file object: encoding it needs no TensorFlow
            example = {'id': f'{split}_{i}', 'image': png, 'label': int(label)}
            writer.write(builder.info.features.serialize_example(example))
        writer.close()
        infos.append(
            splits_lib.SplitInfo(
                name=split, shard_lengths=[size], num_bytes=0, filename_template=template
            )
        )
        written[split] = (images, labels)
    builder.info.set_splits(splits_lib.SplitDict(infos))
    builder.info.write_to_directory(builder.data_path)
    return data_dir, written


@pytest.mark.parametrize('name, num_classes', [('cifar10', 10), ('cifar100', 100)])
def test_load_mocked_cifar(mock_tfds, tmp_path, name, num_classes):
    ds = data.load_dataset(name, data_dir=tmp_path)
    assert (ds.name, ds.num_classes, ds.eval_split) == (name, num_classes, 'test')
    for images, labels in (
        (ds.train_images, ds.train_labels),
        (ds.test_images, ds.test_labels),
    ):
        assert images.shape == (NUM_MOCK, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (NUM_MOCK,) and labels.dtype == np.int32
        assert labels.min() >= 0 and labels.max() < num_classes
    np.testing.assert_array_equal(ds.train_labels, ds.train_true_labels)
    assert ds.flipped_indices.size == 0
    assert ds.mean.shape == ds.std.shape == (3,)
    assert ds.mean.dtype == ds.std.dtype == np.float32


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_validation_split_holds_out_the_last_examples(mock_tfds, tmp_path, name):
    full = data.load_dataset(name, data_dir=tmp_path)
    ds = data.load_dataset(name, data_dir=tmp_path, validation_size=8)
    assert ds.eval_split == 'validation'
    np.testing.assert_array_equal(ds.train_images, full.train_images[:-8])
    np.testing.assert_array_equal(ds.train_labels, full.train_labels[:-8])
    np.testing.assert_array_equal(ds.test_images, full.train_images[-8:])
    np.testing.assert_array_equal(ds.test_labels, full.train_true_labels[-8:])


def test_mocked_cifar10_n_trains_on_human_labels(mock_tfds, tmp_path):
    ds = data.load_dataset('cifar10_n', data_dir=tmp_path)
    (size, read), _, _ = cifar.open_cifar('cifar10_n', data_dir=tmp_path,
                                          human_label='aggre_label')
    train = read(np.arange(size))
    assert ds.num_classes == 10 and ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_true_labels, train['label'])
    # The mock draws every field at random, so the human labels differ from the clean ones.
    np.testing.assert_array_equal(
        ds.flipped_indices, np.flatnonzero(ds.train_labels != train['label'])
    )
    assert ds.flipped_indices.size > 0
    assert not np.array_equal(ds.train_labels, train['noisy_label'])  # another field


def test_mocked_cifar10_label_noise(mock_tfds, tmp_path):
    ds = data.load_dataset('cifar10', data_dir=tmp_path, label_noise=0.25, noise_seed=3)
    expected, flipped = noise.symmetric_noise(ds.train_true_labels, 0.25, 10, seed=3)
    np.testing.assert_array_equal(ds.train_labels, expected)
    np.testing.assert_array_equal(ds.flipped_indices, flipped)
    assert flipped.size == 10


def test_real_array_record_dataset(prepared_cifar10, monkeypatch):
    data_dir, written = prepared_cifar10
    monkeypatch.setattr(tfds_source, 'CHUNK', 5)  # several batched reads, one of them partial
    ds = data.load_dataset('cifar10', data_dir=data_dir)
    np.testing.assert_array_equal(ds.train_images, written['train'][0])
    np.testing.assert_array_equal(ds.train_labels, written['train'][1])
    np.testing.assert_array_equal(ds.test_images, written['test'][0])
    np.testing.assert_array_equal(ds.test_labels, written['test'][1])
    expected_mean = written['train'][0].reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(ds.mean, expected_mean, rtol=1e-6)


def test_open_dataset_reads_only_the_rows_asked_for(prepared_cifar10, monkeypatch):
    data_dir, written = prepared_cifar10
    opened = tfds_source.open_split
    asked = []

    class Recording:  # the real ArrayRecord source, with every record key it is asked for
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitems__(self, keys):
            asked.extend(keys)
            return self.source.__getitems__(keys)

    monkeypatch.setattr(tfds_source, 'open_split',
                        lambda *args, **kwargs: Recording(opened(*args, **kwargs)))
    monkeypatch.setattr(tfds_source, 'CHUNK', 2)
    source = data.open_dataset('cifar10', data_dir=data_dir, validation_size=4)
    assert asked == []  # opening reads nothing
    num_train = len(written['train'][1]) - 4
    assert (source.num_train, source.num_eval, source.eval_split) == (num_train, 4, 'validation')
    rows = np.array([7, 2, 11])
    train = source.read_train(rows)
    np.testing.assert_array_equal(train['image'], written['train'][0][rows])
    np.testing.assert_array_equal(train['label'], written['train'][1][rows])
    assert asked == rows.tolist()
    held_out = source.read_eval([3, 0])  # the last 4 training examples
    expected = written['train'][0][[num_train + 3, num_train]]
    np.testing.assert_array_equal(held_out['image'], expected)
    assert sorted(held_out) == ['image', 'label']
    with pytest.raises(IndexError, match=r'rows must be in \[0, 4\)'):
        source.read_eval([4])


def test_pixel_counts_add_up_across_shards():
    images = np.random.default_rng(0).integers(0, 256, (12, 4, 4, 3), dtype=np.uint8)
    counts = data.pixel_counts(images[:5]) + data.pixel_counts(images[5:])
    assert counts.shape == (3, 256) and counts.sum() == images.size
    for got, want in zip(data.stats_from_counts(counts), data.channel_stats(images)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100', 'cifar10_n'])
@pytest.mark.parametrize('missing', ['empty', 'absent'])
def test_unprepared_dataset_error_is_one_line(tmp_path, name, missing):
    data_dir = tmp_path if missing == 'empty' else tmp_path / 'absent'
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset(name, data_dir=data_dir)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert '\n' not in message
    assert '--config.data_dir' in message and 'download_and_prepare' in message
    assert f"tfds.builder('{name}'" in message and str(data_dir) in message
    assert not any(tmp_path.rglob('*.array_record*'))  # nothing was downloaded


@pytest.mark.parametrize(
    'kwargs, match',
    [
        (dict(name='mnist'), 'cifar10, cifar100, cifar10_n, digits'),
        (dict(name='digits', noise_type='pair'), 'noise_type'),
        (dict(name='digits', label_noise=1.0), r'\[0, 1\)'),
        (dict(name='cifar10_n', label_noise=0.2), 'human label noise'),
        (dict(name='cifar100', label_noise=0.2, noise_type='asymmetric'), 'symmetric'),
        (dict(name='digits', validation_size=-1), 'validation_size'),
        (dict(name='digits', validation_size=10**6), 'validation_size'),
    ],
)
def test_load_dataset_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset(**kwargs)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_range():
    ds = data.load_dataset('digits')
    assert ds.train_images.shape == (1438, 8, 8, 1) and ds.test_images.shape == (359, 8, 8, 1)
    assert ds.train_images.dtype == ds.test_images.dtype == np.uint8
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    assert ds.train_labels.dtype == ds.test_labels.dtype == np.int32
    assert ds.num_classes == 10 and ds.mean.shape == ds.std.shape == (1,)


def test_digits_validation_split_and_noise():
    ds = data.load_dataset('digits', validation_size=100, label_noise=0.1, noise_seed=1)
    assert ds.eval_split == 'validation' and ds.num_train == 1338
    assert ds.test_images.shape == (100, 8, 8, 1)
    assert ds.flipped_indices.size == round(0.1 * 1338)


def test_digits_split_is_seeded_and_stratified():
    from sklearn import datasets

    labels = datasets.load_digits().target
    train, test = digits.stratified_split(labels, 0.2, seed=0)
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == labels.size
    np.testing.assert_allclose(np.bincount(labels[test]) / np.bincount(labels), 0.2, atol=0.02)
    again = digits.stratified_split(labels, 0.2, seed=0)
    np.testing.assert_array_equal(again[1], test)
    assert not np.array_equal(digits.stratified_split(labels, 0.2, seed=1)[1], test)
    first, second = digits.load_digits(), digits.load_digits()
    np.testing.assert_array_equal(first[0]['image'], second[0]['image'])
    np.testing.assert_array_equal(first[1]['label'], second[1]['label'])


@pytest.mark.parametrize('read', ['csv', 'sklearn'])
def test_digits_are_scikit_learns_whichever_way_they_are_read(read, monkeypatch):
    from sklearn import datasets

    if read == 'sklearn':  # the fallback, when the CSV is not where scikit-learn kept it
        monkeypatch.setattr(digits, '_CSV', 'no_such_file.csv.gz')
    pixels, labels = digits._read_digits()
    want = datasets.load_digits()
    np.testing.assert_array_equal(pixels, want.data)
    np.testing.assert_array_equal(labels, want.target)


def test_channel_stats_are_exact():
    images = np.random.default_rng(0).integers(0, 256, (20, 5, 5, 3), dtype=np.uint8)
    mean, std = data.channel_stats(images)
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-6)


# --------------------------------------------------------------------------- noise


@pytest.mark.parametrize('rate', [0.0, 0.2, 0.45, 0.9])
@pytest.mark.parametrize('num_classes', [2, 10])
def test_symmetric_noise_flips_exactly_to_other_classes(rate, num_classes):
    labels = np.random.default_rng(1).integers(0, num_classes, 1001)
    noisy, flipped = noise.symmetric_noise(labels, rate, num_classes, seed=0)
    assert noisy.dtype == np.int32 and flipped.size == round(rate * labels.size)
    np.testing.assert_array_equal(np.flatnonzero(noisy != labels), flipped)
    assert noisy.min() >= 0 and noisy.max() < num_classes


def test_symmetric_noise_reaches_every_other_class_and_is_seeded():
    labels = np.zeros(3000, np.int64)
    noisy, flipped = noise.symmetric_noise(labels, 0.9, 10, seed=0)
    counts = np.bincount(noisy[flipped], minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * flipped.size / 9
    again = noise.symmetric_noise(labels, 0.9, 10, seed=0)
    other = noise.symmetric_noise(labels, 0.9, 10, seed=1)
    np.testing.assert_array_equal(again[0], noisy)
    assert not np.array_equal(other[0], noisy)


@pytest.mark.parametrize('rate', [0.1, 0.4])
def test_asymmetric_noise_follows_the_cifar10_map(rate):
    labels = np.random.default_rng(2).integers(0, 10, 5000)
    noisy, flipped = noise.asymmetric_noise(labels, rate, seed=0)
    np.testing.assert_array_equal(np.flatnonzero(noisy != labels), flipped)
    for source, target in {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}.items():
        members = labels == source
        changed = members & (noisy != labels)
        assert changed.sum() == round(rate * members.sum())
        assert np.all(noisy[changed] == target)
    untouched = np.isin(labels, [0, 1, 6, 7, 8])
    np.testing.assert_array_equal(noisy[untouched], labels[untouched])
    np.testing.assert_array_equal(noise.asymmetric_noise(labels, rate, seed=0)[0], noisy)
    assert not np.array_equal(noise.asymmetric_noise(labels, rate, seed=1)[0], noisy)


@pytest.mark.parametrize('rate', [-0.1, 1.0, 1.5])
def test_noise_rejects_bad_rates(rate):
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        noise.symmetric_noise(np.zeros(5, int), rate, 10, seed=0)
    with pytest.raises(ValueError, match=r'\[0, 1\)'):
        noise.asymmetric_noise(np.zeros(5, int), rate, seed=0)


def test_save_noise_audit_round_trip(tmp_path):
    labels = np.arange(50) % 10
    noisy, flipped = noise.symmetric_noise(labels, 0.3, 10, seed=0)
    path = tmp_path / 'label_noise.audit'
    noise.save_noise_audit(path, labels, noisy, flipped)
    assert os.listdir(tmp_path) == ['label_noise.audit']  # exactly the path asked for
    with np.load(path) as audit:
        np.testing.assert_array_equal(audit['true_labels'], labels)
        np.testing.assert_array_equal(audit['noisy_labels'], noisy)
        np.testing.assert_array_equal(audit['flipped_indices'], flipped)


# --------------------------------------------------------------------------- augmentation


def _images(batch=64, size=32, channels=3, seed=0):
    return np.random.default_rng(seed).integers(
        0, 256, (batch, size, size, channels), dtype=np.uint8
    )


def _augment(images, key=0, **kwargs):
    kwargs = dict(dict(mean=MEAN, std=STD), **kwargs)
    return np.asarray(augment.augment(jax.random.key(key), images, **kwargs))


def test_normalize():
    images = _images(batch=2)
    expected = (images / 255.0 - MEAN) / STD
    np.testing.assert_allclose(augment.normalize(images, MEAN, STD), expected, atol=1e-6)


def test_augment_shapes_dtype_determinism():
    images = _images()
    out = _augment(images)
    assert out.shape == images.shape and out.dtype == np.float32
    np.testing.assert_array_equal(_augment(images), out)
    assert not np.array_equal(_augment(images, key=1), out)
    small = _augment(_images(size=8, channels=1), mean=0.2, std=0.3, crop_padding=1, cutout_size=4)
    assert small.shape == (64, 8, 8, 1)


def test_augment_compiles_once_and_works_under_jit():
    images = _images(batch=8)
    kwargs = dict(mean=MEAN, std=STD, cutout_prob=0.7)
    augment.augment(jax.random.key(0), images, **kwargs)
    size = augment._augment._cache_size()
    augment.augment(jax.random.key(1), _images(batch=8, seed=1), **kwargs)
    assert augment._augment._cache_size() == size
    jitted = jax.jit(lambda key, x: augment.augment(key, x, **kwargs))
    np.testing.assert_array_equal(
        jitted(jax.random.key(2), images), augment.augment(jax.random.key(2), images, **kwargs)
    )


def test_identity_without_augmentation():
    images = _images()
    out = _augment(images, crop_padding=0, flip=False, cutout_prob=0.0)
    np.testing.assert_allclose(out, augment.normalize(images, MEAN, STD), atol=ATOL)


def test_flip_mirrors_about_half_of_the_images():
    images = _images()
    base = np.asarray(augment.normalize(images, MEAN, STD))
    out = _augment(images, crop_padding=0, cutout_prob=0.0)
    same = np.all(np.isclose(out, base, rtol=0, atol=ATOL), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(out, base[:, :, ::-1], rtol=0, atol=ATOL), axis=(1, 2, 3))
    assert np.all(same ^ mirrored) and 0 < mirrored.sum() < len(images)


def test_crop_is_a_window_of_the_zero_padded_image():
    pad = 4
    images = _images()
    base = np.asarray(augment.normalize(images, MEAN, STD))
    padded = np.pad(base, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = _augment(images, crop_padding=pad, flip=False, cutout_prob=0.0)
    offsets = set()
    for i in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if np.allclose(out[i], padded[i, dy : dy + 32, dx : dx + 32], rtol=0, atol=ATOL)
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 20  # offsets are drawn per example


@pytest.mark.parametrize('size', [16, 5])
def test_cutout_zeroes_a_clipped_square(size):
    images = _images()
    base = np.asarray(augment.normalize(images, MEAN, STD))
    assert np.all(base != 0)
    out = _augment(images, crop_padding=0, flip=False, cutout_size=size, cutout_prob=1.0)
    full = 0
    for i in range(len(images)):
        hole = np.all(out[i] == 0, axis=-1)
        rows, cols = np.flatnonzero(hole.any(1)), np.flatnonzero(hole.any(0))
        assert hole.sum() == rows.size * cols.size  # a rectangle ...
        assert np.ptp(rows) == rows.size - 1 and np.ptp(cols) == cols.size - 1  # contiguous
        assert 0 < rows.size <= size and 0 < cols.size <= size
        np.testing.assert_allclose(out[i][~hole], base[i][~hole], atol=ATOL)
        away = 0 < rows[0] and rows[-1] < 31 and 0 < cols[0] and cols[-1] < 31
        if away:  # ... of exactly size x size unless clipped at a border
            assert hole.sum() == size * size
            full += 1
    assert full > 0


def test_cutout_probability():
    images = _images()
    out = _augment(images, crop_padding=0, flip=False, cutout_prob=0.5)
    holes = np.all(out == 0, axis=(-1)).any(axis=(1, 2))
    assert 0 < holes.sum() < len(images)


@pytest.mark.parametrize(
    'images, kwargs, match',
    [
        (_images(size=8, channels=1), dict(mean=0.2, std=0.3), 'cutout_size'),
        (_images(), dict(crop_padding=-1), 'crop_padding'),
        (_images(), dict(cutout_prob=1.5), 'cutout_prob'),
        (_images(), dict(mean=np.zeros(2)), 'mean'),
        (_images().astype(np.float32), dict(), 'uint8'),
        (_images()[0], dict(), 'uint8'),
    ],
)
def test_augment_rejects_bad_arguments(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _augment(images, **kwargs)
