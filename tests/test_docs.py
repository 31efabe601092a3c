"""The documentation cannot rot: every page's Python runs, and the site builds with -W.

Each Markdown page under docs/ is one test: its ```python fenced blocks run in order in one
fresh namespace (a block written as a doctest, with ``>>>`` prompts, is checked as one).
Blocks fenced as anything else (```text, ```bash, MyST directives) are not run. The build
test runs Sphinx with warnings as errors, as ``make docs`` does.
"""

import doctest
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

import vasso_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'
_FENCE = re.compile(r'^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)')


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, code)`` of each ```python block of a Markdown page, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = len(opening['indent']), opening['fence']
        closing = re.compile(rf'^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$')
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            j += 1
        if opening['info'] == 'python':
            body = [line[indent:] if line[:indent].isspace() else line for line in lines[i + 1 : j]]
            blocks.append((i + 2, '\n'.join(body) + '\n'))
        i = j + 1
    return blocks


def test_python_blocks_parser():
    page = (
        'text\n```python\na = 1\n```\n```text\nnot run\n```\n'
        '- item\n\n  ````python\n  b = 2\n  ```\n  still b\n  ````\n```bash\nls\n```\n'
    )
    assert python_blocks(page) == [(3, 'a = 1\n'), (11, 'b = 2\n```\nstill b\n')]


def test_doctest_blocks_are_checked():
    _run_block('>>> x = 2\n>>> print(x + 1)\n3\n', {}, 'good')
    with pytest.raises(AssertionError, match='doctest failed'):
        _run_block('>>> print(1 + 1)\n3\n', {}, 'bad')


def _pages() -> list[pathlib.Path]:
    pages = sorted(p for p in DOCS.rglob('*.md') if '_build' not in p.parts)
    return [p for p in pages if python_blocks(p.read_text())]


def _run_block(code: str, namespace: dict, where: str) -> None:
    if code.lstrip().startswith('>>>'):
        test = doctest.DocTestParser().get_doctest(code, namespace, where, where, 0)
        flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
        runner = doctest.DocTestRunner(optionflags=flags)
        runner.run(test, clear_globs=False)
        assert not runner.failures, f'{where}: doctest failed (output above)'
    else:
        exec(compile(code, where, 'exec'), namespace)


@pytest.mark.parametrize('page', _pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_runs(page):
    namespace = {'__name__': f'docs.{page.stem}'}
    for line, code in python_blocks(page.read_text()):
        _run_block(code, namespace, f'{page.relative_to(ROOT)}:{line}')


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
    pytest.importorskip('sphinx')
    pytest.importorskip('myst_parser')
    cmd = [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q', '-b', 'html',
           '-d', str(tmp_path / 'doctrees'), str(DOCS), str(tmp_path / 'html')]
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    api = (tmp_path / 'html' / 'api' / 'vasso_jax.html').read_text()
    names = [n for n in vasso_jax.__all__ if not inspect.ismodule(getattr(vasso_jax, n))]
    missing = [n for n in names if f'id="vasso_jax.{n}"' not in api]
    assert not missing, f'not in the API reference: {missing}'
