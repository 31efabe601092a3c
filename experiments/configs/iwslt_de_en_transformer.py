r"""Machine translation: a Transformer on TED talks German -> English, fairseq's IWSLT recipe.

Run: ``python -m experiments.train --config experiments/configs/iwslt_de_en_transformer.py
--workdir DIR`` (VaSSO before AdamW; ``--config.optimizer=sam``, or ``sgd`` for no link, i.e.
plain AdamW). It is ``experiments/translation``'s task: every key below, at its default.

Sources, cited per field as [tag]:
  [F] fairseq's ``examples/translation/README.md``, IWSLT'14 German to English:
      ``--arch transformer_iwslt_de_en --share-decoder-input-output-embed --optimizer adam
      --adam-betas '(0.9, 0.98)' --clip-norm 0.0 --lr 5e-4 --lr-scheduler inverse_sqrt
      --warmup-updates 4000 --dropout 0.3 --weight-decay 0.0001 --criterion
      label_smoothed_cross_entropy --label-smoothing 0.1 --max-tokens 4096``, beam 5.
  [A] fairseq's ``transformer_iwslt_de_en`` architecture: 6+6 layers, d_model 512, FFN 1024,
      4 heads (``experiments/translation/model.py``).

Deviations, on purpose: the data is TFDS's ``ted_multi_translate`` (the TED talks IWSLT is
cut from, with its own split) rather than fairseq's IWSLT'14 preparation; one joint
SentencePiece vocabulary of about 10k pieces (fairseq: joint BPE of 10k) shares all
embeddings (fairseq's ``--share-all-embeddings``); AdamW's decay is decoupled (fairseq's
``adam`` with ``--weight-decay`` is AdamW too); BLEU is sacrebleu's on detokenised text.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the translation defaults (ted_multi_translate de->en, VaSSO + AdamW)."""
    config = ml_collections.ConfigDict()
    config.task = 'translation'

    # Optimiser (experiments/runtime/optimizers.py): the sharpness-aware link, then AdamW.
    config.optimizer = 'vasso'  # sgd (none: plain AdamW) | sam | vasso | any vasso_jax link
    config.optimizer_kwargs = ml_collections.ConfigDict()
    config.rho = 0.05  # SAM's usual radius; not tuned for translation
    config.theta = 0.4
    config.adaptive = False
    config.eta = 0.01
    config.every_k = 1
    config.ascent_group_size = 0  # m-sharpness is for fixed-size batches: must stay 0 here
    config.data_shards = 0  # 0: one per device; a fixed number makes batches device-independent
    config.log_stability = False
    config.base_optimizer = 'adamw'  # [F] adam with decoupled weight decay
    config.base_optimizer_kwargs = ml_collections.ConfigDict({'b1': 0.9, 'b2': 0.98})  # [F]
    config.momentum = 0.9  # sgd's only; unused with adamw
    config.nesterov = False
    config.learning_rate = 5e-4  # [F]
    config.lr_schedule = 'inverse_sqrt'  # [F]
    config.min_learning_rate = 0.0
    config.warmup_epochs = 0
    config.warmup_steps = 4000  # [F] --warmup-updates
    config.weight_decay = 1e-4  # [F]
    config.label_smoothing = 0.1  # [F]

    # Model [A]: experiments.translation.model.TransformerConfig's fields.
    config.model_kwargs = ml_collections.ConfigDict({
        'd_model': 512, 'ffn_dim': 1024, 'num_heads': 4, 'encoder_layers': 6,
        'decoder_layers': 6, 'dropout': 0.3, 'attention_dropout': 0.0,
        'activation_dropout': 0.0, 'normalize_before': False})

    # Data: a TFDS dataset prepared as array_record (never downloaded).
    config.dataset = 'ted_multi_translate'  # | wmt14_translate/de-en
    config.source_lang = 'de'
    config.target_lang = 'en'
    config.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir
    config.vocab_size = 10_000  # joint SentencePiece pieces (a soft limit)
    # Where the vocabulary is cached; '' = DATA_DIR/sentencepiece (TFDS's default data dir when
    # --config.data_dir is unset). Its file name holds a digest of the training text.
    config.vocab_dir = ''
    config.max_source_positions = 256  # longer pairs (pieces, EOS included) are dropped
    config.max_target_positions = 256
    # Padded lengths of the batches (one compilation each); empty: multiples of 8 growing by
    # 1.25x up to the longest pair (about 10% padding).
    config.bucket_lengths = ()
    config.eval_split = 'validation'  # | test: scored by loss, perplexity and BLEU

    # Schedule of the run. batch_size is a token budget, fairseq's --max-tokens: a batch
    # has max_tokens // L rows of padded length L (a multiple of the data shards).
    config.num_epochs = 50
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.batch_size = 4096  # [F] --max-tokens
    config.eval_batch_size = 8192  # token budget of evaluation and decoding
    config.beam_size = 5  # [F]; 1 decodes greedily
    config.length_penalty = 1.0
    config.bleu_examples = 0  # sentences decoded for BLEU at each evaluation; 0 = all
    config.seed = 1

    config.log_every_steps = 100
    config.eval_every_steps = -1  # <= 0: once an epoch
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 2
    config.progress_bar = True
    config.skip_nonfinite = False
    return config
