"""Doctests of the Flax integrations need flax (the `flax` extra); skip them without it."""

import importlib.util

collect_ignore = (
    [] if importlib.util.find_spec('flax') else ['vasso_jax/nnx.py', 'vasso_jax/linen.py']
)
