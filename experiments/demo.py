"""``python -m experiments.demo``: the offline demo (``experiments/study/demo.py``)."""

from absl import app

from experiments.runtime import cli
from experiments.study import demo

if __name__ == '__main__':
    app.run(demo.main, flags_parser=cli.parse_flags)
