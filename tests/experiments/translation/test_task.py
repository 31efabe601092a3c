"""Translation as the runtime's second task: the CLI under mock data, resume, config checks."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import optax
import pytest

from experiments.configs import iwslt_de_en_transformer, translation_tiny
from experiments.runtime import errors, optimizers
from experiments.study import grids, reproduce
from experiments.translation import task
from tests.experiments.conftest import REPO, cli_command, cli_env, run_cli

# ted_multi_translate's mock examples hold random language codes, never de and en; wmt14's
# mock examples have 'de' and 'en' texts, so the tests train on those.
MOCK = ['--config.dataset=wmt14_translate/de-en']


@pytest.mark.slow
def test_documented_cli_trains_decodes_and_writes_bleu_under_mock_data(tmp_path):
    # The documented command; only the model and the token budgets are cut for CPU.
    result = run_cli(['--config', 'experiments/configs/iwslt_de_en_transformer.py',
                      '--workdir', str(tmp_path / 'run'), *MOCK,
                      f'--config.vocab_dir={tmp_path / "vocab"}',
                      '--config.num_train_steps=2', '--config.warmup_steps=1',
                      '--config.model_kwargs.d_model=16', '--config.model_kwargs.ffn_dim=32',
                      '--config.model_kwargs.encoder_layers=1',
                      '--config.model_kwargs.decoder_layers=1',
                      '--config.max_source_positions=64', '--config.max_target_positions=64',
                      '--config.bucket_lengths=(64,)', '--config.bleu_examples=4',
                      '--config.beam_size=2', '--config.eval_every_steps=2',
                      '--config.progress_bar=False'],
                     mock_examples=24)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
    assert summary['steps'] == 2 and summary['completed'] and summary['optimizer'] == 'vasso'
    assert 0.0 <= summary['final_bleu'] == summary['best_bleu'] <= 100.0
    assert summary['final_eval_perplexity'] > 1.0 and summary['tokens_per_sec'] > 0
    assert 'best_bleu' in result.stdout
    assert (tmp_path / 'run' / 'spm.model').stat().st_size > 0
    assert 'BLEU' in (tmp_path / 'run' / 'samples.txt').read_text()
    records = [json.loads(line) for line in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert [r['step'] for r in records if 'validation_bleu' in r] == [2]  # eval at the end


@pytest.mark.slow
def test_kill_9_then_rerun_is_bitwise_equal_to_a_straight_run(tmp_path):
    # The tiny config under mock data, checkpointing every step; the victim is killed with
    # SIGKILL at a random moment after its second checkpoint, then the same command resumes.
    args = lambda workdir: [
        '--config', 'experiments/configs/translation_tiny.py', '--workdir', str(workdir), *MOCK,
        f'--config.vocab_dir={tmp_path / "vocab"}', '--config.num_train_steps=6',
        '--config.checkpoint_every_steps=1', '--config.keep_checkpoints=3',
        '--config.eval_every_steps=100', '--config.bleu_examples=2']
    straight = run_cli(args(tmp_path / 'straight'), mock_examples=24)
    assert straight.returncode == 0, straight.stderr[-3000:]
    workdir = tmp_path / 'victim'
    with open(tmp_path / 'victim.err', 'w') as err:
        victim = subprocess.Popen(cli_command(args(workdir), mock_examples=24), cwd=REPO,
                                  env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 600
        while not (workdir / 'checkpoints' / '2').exists():
            assert victim.poll() is None, (tmp_path / 'victim.err').read_text()[-3000:]
            assert time.monotonic() < deadline, 'no checkpoint at step 2 within 600 s'
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.3))
        assert victim.poll() is None, 'the run ended before the kill'
        victim.send_signal(signal.SIGKILL)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(timeout=600)
    assert victim.returncode == -signal.SIGKILL
    resumed = run_cli(args(workdir), mock_examples=24)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours = json.loads((workdir / 'summary.json').read_text())
    reference = json.loads((tmp_path / 'straight' / 'summary.json').read_text())
    assert ours['steps'] == 6 and ours['completed']
    assert ours['params_checksum'] == reference['params_checksum']
    assert ours['final_bleu'] == reference['final_bleu']


def test_offline_is_one_line_naming_data_dir_and_exit_2(tmp_path):
    result = run_cli(['--config', 'experiments/configs/iwslt_de_en_transformer.py',
                      '--workdir', str(tmp_path / 'run'), f'--config.data_dir={tmp_path}'])
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and '--config.data_dir' in lines[0], result.stderr
    assert 'ted_multi_translate' in lines[0]


def test_a_split_without_the_language_pair_is_one_line(mock_tfds, tmp_path):
    config = translation_tiny.get_config()  # ted_multi_translate: mock languages are random
    with pytest.raises(errors.BadInputError, match='--config.source_lang'):
        task.TASK.load(config, mesh=None, num_shards=1)


def test_the_defaults_are_fairseqs_iwslt_recipe():
    config = task.TASK.default_config()
    assert config.task == 'translation' and config.optimizer == 'vasso'
    assert (config.base_optimizer, dict(config.base_optimizer_kwargs)) == (
        'adamw', {'b1': 0.9, 'b2': 0.98})
    assert (config.learning_rate, config.lr_schedule, config.warmup_steps) == (
        5e-4, 'inverse_sqrt', 4000)
    assert (config.label_smoothing, config.model_kwargs.dropout, config.batch_size) == (
        0.1, 0.3, 4096)
    model = task.model_config(config, 10_000)
    assert (model.d_model, model.ffn_dim, model.num_heads, model.encoder_layers) == (
        512, 1024, 4, 6)
    task.validate_config(config)
    task.validate_config(translation_tiny.get_config())


def test_inverse_sqrt_schedule_of_the_runtime():
    config = iwslt_de_en_transformer.get_config()
    schedule = optimizers.make_schedule(config, num_steps=100_000, epoch_steps=1000)
    lr = 5e-4
    for t, expected in [(0, 0.0), (2000, lr / 2), (4000, lr), (16000, lr / 2),
                        (36000, lr / 3)]:
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-6)
    # The same chain a user writes by hand: vasso -> adamw(b2=0.98) with this schedule.
    tx = optimizers.make_optimizer(config, schedule)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize('overrides,message', [
    ({'lr_schedule': 'inverse_sqrt', 'warmup_steps': 0}, '--config.lr_schedule'),
    ({'dataset': 'iwslt14'}, '--config.dataset'),
    ({'target_lang': 'de'}, '--config.target_lang'),
    ({'model_kwargs': {'d_model': 30}}, '--config.model_kwargs.d_model'),
    ({'model_kwargs': {'width': 3}}, '--config.model_kwargs.width'),
    ({'ascent_group_size': 2}, '--config.ascent_group_size'),
    ({'bucket_lengths': (16,)}, '--config.bucket_lengths'),
    ({'optimizer': 'vasso', 'theta': 1.5}, '--config.theta'),
    ({'base_optimizer_kwargs': {'b3': 0.9}}, '--config.base_optimizer_kwargs.b3'),
])
def test_bad_values_are_one_line_naming_the_key(overrides, message):
    config = translation_tiny.get_config()
    for key, value in overrides.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    with pytest.raises(errors.ConfigError, match=message.replace('.', r'\.')) as info:
        task.validate_config(config)
    assert '\n' not in str(info.value)


def test_the_reproduce_grid_has_adamw_sam_vasso_by_seed_and_valid_configs():
    grid = grids.get_grid('iwslt_de_en')
    cells = grids.cells(grid)
    assert [(c.optimizer, c.seed) for c in cells[:3]] == [('sgd', 0), ('sam', 0), ('vasso', 0)]
    assert len(cells) == 9
    for cell in cells[:3]:
        config = grids.make_config(grid, cell, {'data_dir': '/data'})
        assert grids.task_name(config) == 'translation' and 'label_noise' not in config
        task.validate_config(config)  # sgd: no link, i.e. plain AdamW
    assert reproduce.describe({'final_bleu': 27.123}) == 'BLEU 27.12'


@pytest.mark.slow
def test_a_step_on_8_devices_equals_the_step_on_1(tmp_path):
    env = {**os.environ, 'JAX_NUM_CPU_DEVICES': '8',
           'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
    proc = subprocess.run([sys.executable, '-m', 'tests.experiments.translation.devices_check',
                           str(tmp_path / 'vocab')], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'translation devices check passed' in proc.stdout


def test_an_unwritable_vocabulary_folder_is_one_line(mock_tfds, tmp_path):
    (tmp_path / 'file').write_text('not a folder')
    config = _wmt14_config()
    config.vocab_dir = str(tmp_path / 'file' / 'vocab')
    with pytest.raises(errors.BadInputError, match='--config.vocab_dir') as info:
        task.TASK.load(config, mesh=None, num_shards=1)
    assert '\n' not in str(info.value)


def _wmt14_config():
    config = translation_tiny.get_config()
    config.dataset = 'wmt14_translate/de-en'
    return config
