"""Restoring a checkpoint saved before a NamedTuple state gained fields (runtime/migration.py)."""

import logging
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments.runtime import checkpointing, migration


class LinkState(NamedTuple):  # a library state as an older version saved it
    count: object
    d: object


class LinkStateNow(NamedTuple):  # the same state after a release added two fields
    count: object
    d: object
    last_finite: object
    total_notfinite: object
    perturbation: object = None  # an empty field: no array, nothing to fill


class Renamed(NamedTuple):
    count: object
    direction: object
    last_finite: object


def run_state(step, link, d=None):
    d = jnp.arange(4.0) + step if d is None else d
    return {'step': jnp.int32(step), 'params': {'w': jnp.ones(4) * step},
            'opt_state': (link(jnp.int32(step), d), {'momentum': jnp.full(4, step / 10)})}


def now(step, d=None):
    return run_state(step, lambda c, x: LinkStateNow(c, x, jnp.bool_(True), jnp.int32(0)), d)


@pytest.fixture
def manager(tmp_path):
    saving = checkpointing.make_manager(str(tmp_path), keep=2)
    saving.save(2, args=ocp.args.StandardSave(run_state(2, LinkState)))
    saving.wait_until_finished()
    saving.close()
    manager = checkpointing.make_manager(str(tmp_path), keep=2)
    yield manager
    manager.close()


def test_a_new_field_takes_its_initial_value_the_rest_comes_from_the_checkpoint(
        manager, caplog):
    template = now(0)
    with caplog.at_level(logging.WARNING):
        state = checkpointing.restore_latest(manager, template)
    expected = now(2)
    assert int(state['step']) == 2
    np.testing.assert_array_equal(state['params']['w'], expected['params']['w'])
    link, momentum = state['opt_state']
    assert type(link) is LinkStateNow and link.perturbation is None
    np.testing.assert_array_equal(link.d, expected['opt_state'][0].d)
    assert int(link.count) == 2
    assert bool(link.last_finite) is True and int(link.total_notfinite) == 0  # from template
    np.testing.assert_array_equal(momentum['momentum'], expected['opt_state'][1]['momentum'])
    [warning] = [r.getMessage() for r in caplog.records if 'predates' in r.getMessage()]
    assert warning == ('The checkpoint at step 2 predates field(s) last_finite, '
                       'total_notfinite of LinkStateNow; filled with their initial values.')


@pytest.mark.parametrize('template', [
    run_state(0, lambda c, x: Renamed(c, x, jnp.bool_(True))),  # a field renamed
    run_state(0, lambda c, x: LinkStateNow(c, x, jnp.bool_(True), jnp.int32(0)),
              d=jnp.zeros(5)),  # a field reshaped
    run_state(0, lambda c, x: LinkStateNow(c, x.astype(jnp.bfloat16), jnp.bool_(True),
                                           jnp.int32(0))),  # a field of another dtype
    {**now(0), 'extra': jnp.zeros(2)},  # a new key of a dict, not a NamedTuple field
    {**now(0), 'opt_state': (*now(0)['opt_state'], LinkState(jnp.int32(0), jnp.zeros(4)))},
], ids=['renamed', 'reshaped', 'dtype', 'dict-key', 'new-link'])
def test_any_other_difference_is_still_a_mismatch(manager, template):
    with pytest.raises(checkpointing.CheckpointMismatchError, match='does not fit this config'):
        checkpointing.restore_latest(manager, template)


def test_new_fields_names_each_namedtuple_and_its_missing_fields():
    saved = {('opt_state', '0', 'count'), ('opt_state', '0', 'd'), ('step',)}
    template = {'step': 0, 'opt_state': (LinkStateNow(0, 1.0, True, 0),)}
    assert migration.new_fields(template, saved) == {
        (('opt_state', '0'), 'LinkStateNow'): ['last_finite', 'total_notfinite']}
    assert migration.new_fields({'step': 0, 'opt_state': (LinkState(0, 1.0),)}, saved) == {}
    assert migration.new_fields({**template, 'new': 1}, saved) is None
