"""User code by import path: ``--config.model=my_pkg.nets:MyNet`` and the like."""

import importlib


def is_import_path(name) -> bool:
    """Whether ``name`` is an import path (``'pkg.module:attr'`` or ``'pkg.module.attr'``)
    rather than a built-in name."""
    return isinstance(name, str) and (':' in name or '.' in name)


def resolve(path: str):
    """The object at ``path``: ``'pkg.module:attr'`` (or ``'pkg.module.attr'``).

    Raises:
      ImportError: the module cannot be imported or has no such attribute; the message is
        one line and names the path.
    """
    module_name, colon, attr = path.partition(':')
    if not colon:
        module_name, _, attr = path.rpartition('.')
    if not module_name or not attr:
        raise ImportError(f'{path!r} is not an import path; write it as pkg.module:Name.')
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(f'cannot import {module_name!r} for {path!r} ({e}); is it installed '
                          'or on PYTHONPATH?') from e
    obj = module
    for part in attr.split('.'):
        if not hasattr(obj, part):
            raise ImportError(f'{module_name!r} has no {attr!r} (from {path!r}).')
        obj = getattr(obj, part)
    return obj
