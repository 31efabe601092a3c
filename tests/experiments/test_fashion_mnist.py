"""Fashion-MNIST: the offline idx route, the TFDS route, noise maps and the missing-data error.

Nothing here needs the real data: the tests write small idx files themselves.
"""

import gzip
import json
import os

import numpy as np
import pytest

from experiments.image_classification import data
from experiments.image_classification.data import fashion_mnist, noise
from tests.experiments.conftest import run_cli


def _idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of unsigned bytes, written independently of the reader under test."""
    header = bytes([0, 0, 0x08, array.ndim])
    dims = b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
    return header + dims + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx_folder(folder, num_train=64, num_test=16, seed=0, gz=True):
    """Writes the four Fashion-MNIST idx files with random images and balanced labels."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for split, count in (('train', num_train), ('t10k', num_test)):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        arrays[split] = (images, labels)
        for kind, array in (('images-idx3', images), ('labels-idx1', labels)):
            name = os.path.join(folder, f'{split}-{kind}-ubyte')
            payload = _idx_bytes(array)
            if gz:
                with gzip.open(name + '.gz', 'wb') as f:
                    f.write(payload)
            else:
                with open(name, 'wb') as f:
                    f.write(payload)
    return arrays


@pytest.fixture
def no_debian_copy(monkeypatch, tmp_path):
    """Hides the Debian package's folder, so only what a test writes is found."""
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', str(tmp_path / 'no-debian-package'))


@pytest.mark.parametrize('gz', [True, False])
def test_idx_folder_loads_exactly(tmp_path, no_debian_copy, gz):
    arrays = write_idx_folder(tmp_path / 'fm', gz=gz)
    train, test, num_classes = fashion_mnist.load_fashion_mnist(tmp_path / 'fm')
    assert num_classes == 10
    assert train['image'].shape == (64, 28, 28, 1) and train['image'].dtype == np.uint8
    np.testing.assert_array_equal(train['image'][..., 0], arrays['train'][0])
    np.testing.assert_array_equal(test['label'], arrays['t10k'][1])
    assert train['label'].dtype == np.int32


def test_idx_files_in_a_subfolder_are_found(tmp_path, no_debian_copy):
    write_idx_folder(tmp_path / 'fashion-mnist')
    train, _, _ = fashion_mnist.load_fashion_mnist(tmp_path)
    assert len(train['label']) == 64


def test_debian_folder_is_the_default(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / 'debian', num_train=32)
    monkeypatch.setattr(fashion_mnist, 'DEBIAN_DIR', str(tmp_path / 'debian'))
    train, _, _ = fashion_mnist.load_fashion_mnist(None)
    assert len(train['label']) == 32


@pytest.mark.parametrize('damage, match', [
    (lambda b: b'\x01' + b[1:], 'bad magic'),
    (lambda b: b[:-5], 'truncated'),
])
def test_damaged_idx_file_is_named(tmp_path, damage, match):
    path = tmp_path / 'x-idx1-ubyte'
    path.write_bytes(damage(_idx_bytes(np.arange(10, dtype=np.uint8))))
    with pytest.raises(ValueError, match=match):
        fashion_mnist.read_idx(path)


def test_missing_data_is_one_line_naming_both_routes(tmp_path, no_debian_copy):
    with pytest.raises(data.DatasetNotFoundError) as info:
        fashion_mnist.load_fashion_mnist(tmp_path / 'empty')
    message = str(info.value)
    assert '\n' not in message
    assert 'apt-get install dataset-fashion-mnist' in message
    assert '--config.data_dir' in message and 'fashion_mnist' in message


def test_tfds_route(mock_tfds, no_debian_copy, tmp_path):
    train, test, num_classes = fashion_mnist.load_fashion_mnist(tmp_path / 'tfds')
    assert num_classes == 10
    assert train['image'].shape[1:] == (28, 28, 1) and train['image'].dtype == np.uint8
    assert test['label'].dtype == np.int32 and len(train['label']) > 0


def test_train_subset_is_fixed_and_shared(tmp_path, no_debian_copy):
    write_idx_folder(tmp_path, num_train=100)
    source = data.open_dataset('fashion_mnist', data_dir=tmp_path, train_subset=30)
    again = data.open_dataset('fashion_mnist', data_dir=tmp_path, train_subset=30)
    full = data.open_dataset('fashion_mnist', data_dir=tmp_path)
    rows = np.arange(30)
    images = source.read_train(rows)['image']
    np.testing.assert_array_equal(images, again.read_train(rows)['image'])
    # Every subset image is one of the full split's, each a different one.
    flat_full = full.read_train(np.arange(100))['image'].reshape(100, -1)
    matches = [np.flatnonzero((flat_full == x).all(axis=1)) for x in images.reshape(30, -1)]
    assert sorted(int(m[0]) for m in matches) == sorted({int(m[0]) for m in matches})
    assert source.num_train == 30
    with pytest.raises(ValueError, match='train_subset'):
        data.open_dataset('fashion_mnist', data_dir=tmp_path, train_subset=101)


@pytest.mark.parametrize('rate', [0.2, 0.4])
def test_fashion_mnist_asymmetric_noise_rate_and_map(rate):
    labels = np.repeat(np.arange(10), 50)
    noisy, flipped = noise.asymmetric_noise(labels, rate, seed=1,
                                            class_map=noise.FASHION_MNIST_ASYMMETRIC_MAP)
    for source, target in noise.FASHION_MNIST_ASYMMETRIC_MAP.items():
        members = labels == source
        assert np.sum(noisy[members] == target) == round(rate * 50)
        assert set(np.unique(noisy[members])) == {source, target}
    untouched = ~np.isin(labels, list(noise.FASHION_MNIST_ASYMMETRIC_MAP))
    np.testing.assert_array_equal(noisy[untouched], labels[untouched])
    assert len(flipped) == 5 * round(rate * 50)


def test_load_dataset_applies_the_fashion_mnist_map(tmp_path, no_debian_copy):
    write_idx_folder(tmp_path, num_train=200)
    ds = data.load_dataset('fashion_mnist', data_dir=tmp_path, label_noise=0.4,
                           noise_type='asymmetric', noise_seed=3)
    changed = ds.flipped_indices
    assert len(changed) == 5 * round(0.4 * 20)
    for i in changed:
        assert noise.FASHION_MNIST_ASYMMETRIC_MAP[ds.train_true_labels[i]] == ds.train_labels[i]
    with pytest.raises(ValueError, match='class maps for cifar10, fashion_mnist'):
        data.load_dataset('cifar100', label_noise=0.4, noise_type='asymmetric')


@pytest.mark.slow
def test_cli_trains_on_idx_files_and_audits_the_noise(tmp_path):
    write_idx_folder(tmp_path / 'fm', num_train=96, num_test=32)
    workdir = tmp_path / 'run'
    proc = run_cli([
        '--config', 'experiments/configs/fashion_mnist_noise.py', '--workdir', str(workdir),
        f'--config.data_dir={tmp_path / "fm"}', '--config.train_subset=64',
        '--config.batch_size=16', '--config.num_train_steps=2', '--config.log_every_steps=1',
        '--config.model_kwargs.width=4', '--config.eval_batch_size=16',
        '--config.progress_bar=False',
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    audit = np.load(workdir / 'label_noise.npz')
    assert len(audit['flipped_indices']) == round(0.4 * 64)
    summary = json.loads((workdir / 'summary.json').read_text())
    assert summary['steps'] == 2 and summary['dataset'] == 'fashion_mnist'


def test_missing_data_cli_is_one_line_and_leaves_no_run(tmp_path):
    workdir = tmp_path / 'run'
    proc = run_cli([
        '--config', 'experiments/configs/fashion_mnist_noise.py', '--workdir', str(workdir),
        f'--config.data_dir={tmp_path / "empty"}', '--config.num_train_steps=1',
    ])
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert 'apt-get install dataset-fashion-mnist' in lines[-1], proc.stderr[-2000:]
