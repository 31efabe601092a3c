"""The demo's code path in a reduced form: one epoch each of SGD, SAM and VaSSO on digits,
on the tests' tiny BatchNorm MLP instead of the demo's ResNet-18 (``make demo`` runs that
one)."""

import os

import pytest

from experiments.study import demo
from tests.experiments import tiny_model


def test_demo_config_goes_through_the_cifar_trainer():
    config = demo.demo_config('sam', num_epochs=1, progress_bar=False)
    assert (config.optimizer, config.num_epochs, config.dataset) == ('sam', 1, 'digits')
    assert config.label_noise == 0.4


@pytest.mark.slow
def test_demo_one_epoch(tmp_path, monkeypatch):
    demo_config = demo.demo_config

    def small(*args, **kwargs):  # the demo's recipe on a model that compiles in a second
        config = demo_config(*args, **kwargs)
        config.model, config.model_kwargs = tiny_model.PATH, {}
        return config

    monkeypatch.setattr(demo, 'demo_config', small)
    workdir = str(tmp_path)
    summaries = demo.run_demo(workdir, num_epochs=1, progress_bar=False)
    assert list(summaries) == list(demo.OPTIMIZERS)
    for name, summary in summaries.items():
        assert summary['optimizer'] == name and summary['completed']
        assert 0.0 <= summary['final_train_eval_accuracy'] <= 1.0
        assert 0.0 <= summary['final_train_eval_true_accuracy'] <= 1.0
        assert os.path.exists(os.path.join(workdir, name, 'summary.json'))
    table = demo.format_table(summaries)
    assert all(name in table for name in demo.OPTIMIZERS) and '(noisy)' in table
    path = demo.plot(workdir)
    assert path == os.path.join(workdir, 'test_accuracy.png') and os.path.getsize(path) > 1000
