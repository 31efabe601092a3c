# ruff: noqa
# How the fixture was made: run from the repo root at commit 91f2fe4, the layout of
# experiments/ before #12 (experiments.loop); kept as the record, it does not run since.
"""Reference checksums with the pre-restructure code."""
import json, os, sys, tempfile, platform
sys.path.insert(0, os.getcwd())
import jax
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking
from tests.experiments import conftest
from experiments import loop
from experiments.configs import digits_resnet, cifar10_resnet18

CASES = {
  'demo_sgd': ('digits_resnet', dict(optimizer='sgd', num_epochs=1, progress_bar=False)),
  'demo_sam': ('digits_resnet', dict(optimizer='sam', num_epochs=1, progress_bar=False)),
  'demo_vasso': ('digits_resnet', dict(optimizer='vasso', num_epochs=1, progress_bar=False)),
  'digits_vasso_stability_adamw': ('digits_resnet', dict(optimizer='vasso', num_train_steps=4, log_stability=True, base_optimizer='adamw', progress_bar=False, log_every_steps=2)),
  'digits_asam_groups': ('digits_resnet', dict(optimizer='asam', num_train_steps=4, ascent_group_size=16, progress_bar=False, log_every_steps=2)),
  'mock_cifar10_vasso': ('cifar10_resnet18', dict(optimizer='vasso', batch_size=8, eval_batch_size=16, num_train_steps=4, log_every_steps=2, eval_every_steps=2, checkpoint_every_steps=2, progress_bar=False)),
}
out = {}
for name, (cfg, over) in CASES.items():
    mod = {'digits_resnet': digits_resnet, 'cifar10_resnet18': cifar10_resnet18}[cfg]
    config = mod.get_config()
    if cfg == 'cifar10_resnet18':
        config.model_kwargs.width = 4
    config.update(over)
    with tempfile.TemporaryDirectory() as d:
        if 'mock' in name:
            mocking._getitems = conftest._getitems
            with tfds.testing.mock_data(num_examples=conftest.NUM_MOCK):
                s = loop.train_and_evaluate(config, d)
        else:
            s = loop.train_and_evaluate(config, d)
    out[name] = {'config': cfg, 'overrides': over, 'model_kwargs': {'width': 4} if cfg == 'cifar10_resnet18' else {}, 'params_checksum': s['params_checksum'], 'steps': s['steps']}
    print(name, s['params_checksum'], s['steps'], flush=True)
out['_machine'] = {'jax': jax.__version__, 'processor': platform.processor(), 'machine': platform.machine()}
json.dump(out, open('/tmp/rs/reference.json', 'w'), indent=1)
