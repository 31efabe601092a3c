"""Sphinx configuration: MyST pages, the API reference generated from ``vasso_jax``'s docstrings.

``make docs`` builds with ``-W`` (warnings are errors). The API pages under ``docs/api/`` are
written here, at configuration time, from ``vasso_jax.__all__`` (grouped by the private module
that defines each name) and from every public submodule (``vasso_jax.nnx``, ``vasso_jax.linen``,
...) that exists, so a new export or module is documented without editing a page.
"""

import importlib
import inspect
import pathlib
import pkgutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # document the checkout, not an installed copy

import vasso_jax  # noqa: E402

project = 'vasso_jax'
author = 'vasso_jax developers'
copyright = '2026, vasso_jax developers'
release = version = vasso_jax.__version__

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
]
source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
root_doc = 'index'
exclude_patterns = ['_build']

myst_enable_extensions = ['dollarmath', 'amsmath', 'colon_fence']
myst_heading_anchors = 3

# A reference to a vasso_jax name that does not exist is an error (the docs cannot point at a
# renamed function); references to other libraries' names are not checked (no network, so no
# intersphinx inventories to check them against).
nitpicky = True
nitpick_ignore_regex = [(r'py:.*', r'(?!vasso_jax(\.|$)).*')]

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = 'furo'
html_title = f'vasso_jax {version}'

# Section titles of the core API page, by the module that defines a name; a module not listed
# here gets a section titled by the first line of its docstring.
_SECTIONS = {
    'vasso_jax._aliases': 'Methods',
    'vasso_jax._sharpness': 'The engine',
    'vasso_jax._directions': 'Adversaries',
    'vasso_jax._diagnostics': 'Diagnostics',
    'vasso_jax._parallel': 'Devices',
}


def _directive(obj) -> str:
    if inspect.isclass(obj):
        return 'autoclass'
    if callable(obj):
        return 'autofunction'
    return 'autodata'


def _title(module_name: str) -> str:
    if module_name in _SECTIONS:
        return _SECTIONS[module_name]
    doc = inspect.getdoc(importlib.import_module(module_name)) or module_name
    return doc.splitlines()[0].split(': ')[0].rstrip('.')  # the summary before any colon


def _source_order(name: str) -> tuple[bool, int, str]:
    """Factories before their state classes, each in the order of the source file."""
    obj = getattr(vasso_jax, name)
    try:
        line = inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        line = 0
    return inspect.isclass(obj), line, name


def _core_page() -> str:
    groups: dict[str, list[str]] = {}
    for name in sorted(vasso_jax.__all__, key=_source_order):
        if inspect.ismodule(getattr(vasso_jax, name)):
            continue  # a public submodule has a page of its own
        module = getattr(getattr(vasso_jax, name), '__module__', 'vasso_jax')
        groups.setdefault(module, []).append(name)
    order = [m for m in _SECTIONS if m in groups] + sorted(set(groups) - set(_SECTIONS))
    lines = [
        '# `vasso_jax`',
        '',
        '```{eval-rst}',
        '.. module:: vasso_jax',
        '```',
        '',
        'Everything in `vasso_jax.__all__`, grouped by what it does.',
    ]
    for module in order:
        lines += ['', f'## {_title(module)}', '', '```{eval-rst}']
        for name in groups[module]:
            lines.append(f'.. {_directive(getattr(vasso_jax, name))}:: vasso_jax.{name}')
        lines.append('```')
    return '\n'.join(lines) + '\n'


def _submodule_page(name: str) -> str:
    importlib.import_module(name)  # a module that exists but cannot be imported is an error
    return '\n'.join([f'# `{name}`', '', '```{eval-rst}', f'.. automodule:: {name}',
                      '   :members:', '```', ''])


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)  # unchanged files keep their mtime: incremental builds stay so


def write_api_pages() -> list[str]:
    """Writes ``docs/api/*.md`` and returns the page names (without suffix)."""
    out = DOCS / 'api'
    out.mkdir(exist_ok=True)
    pages = {'vasso_jax': _core_page()}
    for info in pkgutil.iter_modules(vasso_jax.__path__):
        if not info.name.startswith('_'):
            name = f'vasso_jax.{info.name}'
            pages[name] = _submodule_page(name)
    for stale in out.glob('*.md'):
        if stale.stem not in pages:
            stale.unlink()
    for name, text in pages.items():
        _write_if_changed(out / f'{name}.md', text)
    return sorted(pages)


write_api_pages()
