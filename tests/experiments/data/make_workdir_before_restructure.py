# ruff: noqa
# How the fixture was made: run from the repo root at commit 91f2fe4, the layout of
# experiments/ before #12 (experiments.loop); kept as the record, it does not run since.
import os, sys, shutil, json
sys.path.insert(0, os.getcwd())
from experiments import loop
from tests.experiments.test_train import digits_config
config = digits_config('vasso', model='resnet18', num_train_steps=4, log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2, keep_checkpoints=1)
d = '/tmp/rs/old_workdir'
shutil.rmtree(d, ignore_errors=True)
config.model_kwargs = {'width': 2, 'dtype': 'float32'}
s = loop.train_and_evaluate(config, d, stop_at_step=2)
print(s['params_checksum'], s['steps'])
d2 = '/tmp/rs/straight'
shutil.rmtree(d2, ignore_errors=True)
s2 = loop.train_and_evaluate(config, d2)
print('straight', s2['params_checksum'])
json.dump({'straight_params_checksum': s2['params_checksum'], 'config_overrides': dict(optimizer='vasso', model='resnet18', num_train_steps=4, log_every_steps=1, eval_every_steps=2, checkpoint_every_steps=2, keep_checkpoints=1)}, open('/tmp/rs/old_workdir_expect.json','w'))
