"""A warning for a classifier that has collapsed to the constant predictor.

Too large a sharpness-aware radius ``rho`` (or learning rate) can drive a classifier to
predict the same distribution for every image: with ``C`` balanced classes its training loss
then sits at ``ln C`` (2.303 for 10 classes), its accuracy at about ``1 / C``, its gradient
norm falls towards zero. SAM and VaSSO both fell into it within the first two epochs on
Fashion-MNIST (10k images) with a BatchNorm-free 4-conv CNN at 40% label noise and ``rho``
0.2 or 0.5 (the calibration of the Fashion-MNIST study), and with the study's BatchNorm CNN
at 60% noise and ``rho`` 0.1 (its grid); a smaller ``rho`` avoided it at 40%. The run goes
on (its result is a finding too), but the log says what happened and what to change.
"""

import math

from absl import logging

# A log interval counts as collapsed when its mean loss is within this fraction of ln C and
# its accuracy at most this multiple of 1 / C ...
LOSS_TOLERANCE = 0.01
ACCURACY_FACTOR = 1.5
# ... and the warning comes after this many such intervals in a row.
PATIENCE = 3


def looks_collapsed(record: dict, num_classes: int) -> bool:
    """Whether a training log record (``train_loss``, ``train_accuracy``) is the constant
    predictor's."""
    chance_loss = math.log(num_classes)
    return (abs(record['train_loss'] - chance_loss) <= LOSS_TOLERANCE * chance_loss
            and record['train_accuracy'] <= ACCURACY_FACTOR / num_classes)


class CollapseWatch:
    """Feeds on the training log records of one run; warns once after :data:`PATIENCE`
    collapsed intervals in a row (:func:`looks_collapsed`)."""

    def __init__(self, num_classes: int, hint: str):
        self.num_classes = num_classes
        self.hint = hint  # what to change, e.g. '--config.rho (now 0.5)'
        self.streak = 0
        self.warned = False

    def update(self, record: dict) -> str | None:
        """Counts ``record``; returns the warning (also logged) the first time it is due."""
        self.streak = self.streak + 1 if looks_collapsed(record, self.num_classes) else 0
        if self.warned or self.streak < PATIENCE:
            return None
        self.warned = True
        grad = (f', gradient norm {record["grad_norm"]:.3g}'
                if record.get('grad_norm') is not None else '')
        message = (
            f'Training has collapsed to the constant predictor: the train loss has sat at '
            f'ln({self.num_classes}) = {math.log(self.num_classes):.3f} for {self.streak} logs '
            f'in a row (now {record["train_loss"]:.4f}, accuracy '
            f'{100 * record["train_accuracy"]:.1f}%{grad}). Try a smaller {self.hint}.')
        logging.warning(message)
        return message
