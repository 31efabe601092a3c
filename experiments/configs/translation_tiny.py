"""A tiny translation run for tests and smoke checks: 1+1 layers of width 32, 2 steps.

``python -m experiments.train --config experiments/configs/translation_tiny.py --workdir DIR``
(it needs ``ted_multi_translate`` prepared, or TFDS mock data as in the tests).
"""

import ml_collections

from experiments.configs import iwslt_de_en_transformer


def get_config() -> ml_collections.ConfigDict:
    config = iwslt_de_en_transformer.get_config()
    config.model_kwargs.update({'d_model': 32, 'ffn_dim': 64, 'num_heads': 4,
                                'encoder_layers': 1, 'decoder_layers': 1, 'dropout': 0.1})
    config.vocab_size = 200
    config.max_source_positions = 64
    config.max_target_positions = 64
    config.bucket_lengths = (64,)  # one shape: one compilation of each step
    config.batch_size = 512
    config.eval_batch_size = 512
    config.warmup_steps = 2
    config.learning_rate = 1e-3
    config.beam_size = 2
    config.bleu_examples = 8
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.progress_bar = False
    return config
