"""``python -m experiments.reproduce``: the paper's grids (``experiments/study/reproduce.py``)."""

from absl import app

from experiments.study import reproduce

if __name__ == '__main__':
    app.run(reproduce.main)
