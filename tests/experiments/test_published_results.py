"""The numbers the repository publishes are the ones its committed grid records generate.

A grid run with ``--results_dir experiments/study/results/GRID`` keeps each finished cell's
record there (:mod:`experiments.study.records`) and a copy of the generated ``results.md``.
The README quotes tables of such reports between ``<!-- results: GRID -->`` and
``<!-- /results -->``. Here every quoted table row must be a row of the report that the
records generate now, and a committed ``results.md`` must be that report: neither can be
edited by hand or go stale when a record is added.
"""

import os
import re

import pytest

from experiments.study import aggregate, grids, records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(REPO, 'experiments', 'study', 'results')
QUOTE = re.compile(r'<!-- results: (\S+) -->\n(.*?)<!-- /results -->', re.S)


def generated_report(grid_name: str, workdir: str) -> str:
    """The report of ``grid_name`` from its committed records alone (no plots)."""
    grid = grids.get_grid(grid_name)
    records.restore(os.path.join(RESULTS, grid_name), workdir, [c.name for c in grids.cells(grid)])
    return aggregate.report(grid, aggregate.collect(grid, workdir), aggregate.load_paper_results())


def unquoted_rows(document: str, report_of) -> list[str]:
    """The table rows of ``document``'s quoted blocks that are not rows of their grid's report
    (``report_of(grid_name) -> markdown``); raises if a block quotes no table row."""
    missing = []
    for grid_name, block in QUOTE.findall(document):
        rows = [line for line in block.splitlines() if line.startswith('|')]
        assert rows, f'the quote of {grid_name} holds no table row'
        report_rows = set(report_of(grid_name).splitlines())
        missing += [f'{grid_name}: {row}' for row in rows if row not in report_rows]
    return missing


def test_a_hand_edited_or_stale_quote_is_caught():
    report = '**T**\n\n| optimizer | noise 40% |\n|---|---:|\n| sam | 80.00 ± 1.00 |\n'
    quote = '<!-- results: g -->\n| optimizer | noise 40% |\n| sam | {} |\n<!-- /results -->'
    assert unquoted_rows(quote.format('80.00 ± 1.00'), lambda _: report) == []
    assert unquoted_rows(quote.format('80.10 ± 1.00'), lambda _: report) == [
        'g: | sam | 80.10 ± 1.00 |']
    with pytest.raises(AssertionError, match='no table row'):
        unquoted_rows('<!-- results: g -->\nprose\n<!-- /results -->', lambda _: report)


def test_readme_tables_are_rows_of_the_generated_reports(tmp_path):
    with open(os.path.join(REPO, 'README.md')) as f:
        readme = f.read()
    quoted = {name for name, _ in QUOTE.findall(readme)}
    assert 'label_noise_fmnist' in quoted  # the Fashion-MNIST study's tables are checked
    reports = {name: generated_report(name, str(tmp_path / name)) for name in quoted}
    assert unquoted_rows(readme, reports.__getitem__) == []


@pytest.mark.parametrize('grid_name', sorted(
    name for name in os.listdir(RESULTS)
    if os.path.exists(os.path.join(RESULTS, name, aggregate.REPORT_FILE))))
def test_committed_report_is_what_the_records_generate(grid_name, tmp_path):
    results_dir = os.path.join(RESULTS, grid_name)
    with open(os.path.join(results_dir, aggregate.REPORT_FILE)) as f:
        tables, _, plots = f.read().partition('\n## Plots\n')
    assert tables == generated_report(grid_name, str(tmp_path)), (
        f'{results_dir}/{aggregate.REPORT_FILE} is stale: regenerate it with `python -m '
        f'experiments.reproduce --grid {grid_name} --workdir runs/{grid_name} --results_dir '
        f'{results_dir} --aggregate_only`')
    for image in re.findall(r'!\[[^]]*\]\(([^)]+)\)', plots):
        assert os.path.exists(os.path.join(results_dir, image)), image
