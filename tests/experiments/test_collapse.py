"""The constant-predictor warning of image classification (experiments/.../collapse.py)."""

import math

from experiments.image_classification import collapse

CHANCE = math.log(10)


def record(loss, accuracy=0.1, grad_norm=0.01):
    return {'train_loss': loss, 'train_accuracy': accuracy, 'grad_norm': grad_norm}


def test_looks_collapsed_needs_both_chance_loss_and_chance_accuracy():
    assert collapse.looks_collapsed(record(CHANCE), 10)
    assert collapse.looks_collapsed(record(1.009 * CHANCE, 0.15), 10)
    assert not collapse.looks_collapsed(record(1.02 * CHANCE), 10)  # still moving
    assert not collapse.looks_collapsed(record(CHANCE, 0.16), 10)  # above chance
    assert not collapse.looks_collapsed(record(0.3, 0.9), 10)


def test_the_warning_comes_once_after_a_streak():
    watch = collapse.CollapseWatch(10, '--config.rho (now 0.2)')
    assert watch.update(record(CHANCE)) is None
    assert watch.update(record(0.5, 0.8)) is None  # a healthy interval resets the streak
    assert [watch.update(record(CHANCE)) for _ in range(2)] == [None, None]
    message = watch.update(record(CHANCE, 0.1, 0.07))
    assert message == (
        'Training has collapsed to the constant predictor: the train loss has sat at '
        'ln(10) = 2.303 for 3 logs in a row (now 2.3026, accuracy 10.0%, gradient norm 0.07). '
        'Try a smaller --config.rho (now 0.2).')
    assert watch.update(record(CHANCE)) is None  # said once
