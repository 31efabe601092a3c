"""The layers of experiments/ import one way: study -> tasks -> runtime -> vasso_jax."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = os.path.join(REPO, 'experiments')
TASKS = ('image_classification', 'translation')
STUDY = ('study', 'benchmarks')


def imported_modules(path: str) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f'{node.module}.{alias.name}' for alias in node.names)
    return names


def sources(folder: str) -> list[str]:
    root = os.path.join(EXPERIMENTS, folder)
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root)
                  for f in files if f.endswith('.py'))


def layer_of(module: str) -> str | None:
    parts = module.split('.')
    if parts[0] != 'experiments' or len(parts) < 2:
        return None
    if parts[1] == 'runtime':
        return 'runtime'
    if parts[1] in TASKS:
        return 'task'
    if parts[1] in STUDY:
        return 'study'
    return parts[1]  # configs, train, demo, reproduce


FORBIDDEN = {
    'runtime': {'task', 'study', 'configs', 'train', 'demo', 'reproduce'},
    'task': {'study', 'train', 'demo', 'reproduce'},
}


@pytest.mark.parametrize('layer,folders', [('runtime', ('runtime',)), ('task', TASKS)])
def test_imports_flow_one_way(layer, folders):
    wrong = []
    for folder in folders:
        for path in sources(folder):
            for module in imported_modules(path):
                if layer_of(module) in FORBIDDEN[layer]:
                    wrong.append(f'{os.path.relpath(path, REPO)} imports {module}')
    assert not wrong, '\n'.join(wrong)


@pytest.mark.parametrize('task', TASKS)
def test_a_task_imports_no_other_task(task):
    others = {f'experiments.{t}' for t in TASKS if t != task}
    wrong = [f'{os.path.relpath(path, REPO)} imports {module}'
             for path in sources(task) for module in imported_modules(path)
             if '.'.join(module.split('.')[:2]) in others]
    assert not wrong, '\n'.join(wrong)


def test_the_check_sees_a_backwards_import(tmp_path):
    path = tmp_path / 'bad.py'
    path.write_text('from experiments.study import grids\n'
                    'import experiments.image_classification\n')
    layers = {layer_of(m) for m in imported_modules(str(path))}
    assert layers & FORBIDDEN['runtime'] == {'study', 'task'}
    assert layers & FORBIDDEN['task'] == {'study'}


def identifiers(path: str) -> set[str]:
    """Names, attributes, arguments and keywords used in the code of ``path``."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
    return names


def test_the_runtime_names_no_images_or_labels():
    for path in sources('runtime'):
        named = {n for n in identifiers(path) if 'image' in n.lower() or 'label' in n.lower()}
        assert not named, f'{path}: {named}'


def test_the_library_imports_no_experiments_nor_flax():
    library = os.path.join(REPO, 'vasso_jax')
    for name in os.listdir(library):
        if not name.endswith('.py') or name in ('nnx.py', 'linen.py'):
            continue
        modules = imported_modules(os.path.join(library, name))
        assert not {m for m in modules if m.split('.')[0] in ('experiments', 'flax')}, name
