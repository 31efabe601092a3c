"""Machine translation as a task of the runtime: sentence pairs, a Transformer, BLEU.

:data:`TASK` implements ``experiments.runtime.task.Task``. Every process reads the whole
(small) parallel text, tokenises it with the joint SentencePiece vocabulary (trained once,
cached) and plans the token-budget batches (:mod:`.data`); the batch of step ``s`` is a pure
function of ``(seed, s)``, built on the host and placed sharded over the devices on its
leading axis, so every process holds the same global batch and a resumed run replays the
same sequence. The train step is :func:`.steps.make_train_step` (the two passes of the
sharpness-aware link see the same batch and the same dropout mask, whose key is a function
of ``(seed, step)``). Evaluation scores the ``eval_split`` by loss, perplexity and sacrebleu
BLEU of beam-search translations; a few samples are logged and appended to
``WORKDIR/samples.txt``.

Configs: ``experiments/configs/iwslt_de_en_transformer.py`` (every key, the defaults) and
``translation_tiny.py``.
"""

import dataclasses
import hashlib
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from experiments.configs import iwslt_de_en_transformer
from experiments.runtime import distributed, errors, metrics
from experiments.runtime import task as runtime_task
from experiments.runtime.config_check import at_least, choice, fail, in_range, number
from experiments.translation import bleu, data, decode, steps
from experiments.translation import model as model_lib
from experiments.translation import tokenizer as tokenizer_lib

SPLITS = ('validation', 'test')
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(model_lib.TransformerConfig)
                   if f.name not in ('vocab_size', 'pad_id'))
SAMPLES_FILE = 'samples.txt'
_NUM_SAMPLES = 3


class TrainState(NamedTuple):
    """The state of a translation run: step, the model's ``nnx.Param`` state, the optax state.

    The model's graph (and its empty non-parameter state) is static and lives in the run.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` (one line naming the key) for an invalid translation key."""
    choice(config, 'dataset', data.DATASETS)
    for key in ('source_lang', 'target_lang'):
        if not isinstance(config[key], str) or not config[key]:
            fail(key, f'must be a language code such as de or en, got {config[key]!r}.')
    if config.source_lang == config.target_lang:
        fail('target_lang', f'={config.target_lang!r} must differ from --config.source_lang.')
    choice(config, 'eval_split', SPLITS)
    in_range(config, 'label_smoothing', '[0, 1)', ' (fairseq: 0.1)')
    at_least(config, 'vocab_size', 16, integer=True)
    at_least(config, 'max_source_positions', 2, integer=True)
    at_least(config, 'max_target_positions', 2, integer=True)
    buckets = tuple(config.bucket_lengths)
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 2 for b in buckets) or (
            buckets and max(buckets) < max(config.max_source_positions,
                                           config.max_target_positions)):
        fail('bucket_lengths', f'={buckets} must be empty or lengths >= 2 whose largest holds '
                               '--config.max_source_positions and max_target_positions.')
    at_least(config, 'beam_size', 1, ' (1 decodes greedily)', integer=True)
    in_range(config, 'length_penalty', '[0, 10]')
    at_least(config, 'bleu_examples', 0, ' (0: the whole split)', integer=True)
    if number(config, 'ascent_group_size', integer=True):
        fail('ascent_group_size', 'must be 0 for translation (its batches vary in rows).')
    if not isinstance(config.vocab_dir, str):
        fail('vocab_dir', f'must be a folder path or empty, got {config.vocab_dir!r}.')
    model_config(config, vocab_size=config.vocab_size)


def model_config(config: ml_collections.ConfigDict, vocab_size: int):
    """``config.model_kwargs`` as a ``TransformerConfig`` of ``vocab_size``; checked."""
    kwargs = dict(config.model_kwargs)
    unknown = sorted(set(kwargs) - set(MODEL_KEYS))
    if unknown:
        fail(f'model_kwargs.{unknown[0]}',
             f'is not a Transformer argument; valid: {", ".join(MODEL_KEYS)}.')
    model = model_lib.TransformerConfig(vocab_size, **kwargs)
    for key in ('d_model', 'ffn_dim', 'num_heads', 'encoder_layers', 'decoder_layers'):
        value = getattr(model, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(f'model_kwargs.{key}', f'must be an integer >= 1, got {value!r}.')
    if model.d_model % (2 * model.num_heads):
        fail('model_kwargs.d_model', f'={model.d_model} must be even and divide by '
                                     f'--config.model_kwargs.num_heads={model.num_heads}.')
    for key in ('dropout', 'attention_dropout', 'activation_dropout'):
        value = getattr(model, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            fail(f'model_kwargs.{key}', f'must be in [0, 1), got {value!r}.')
    return model


def vocab_dir(config: ml_collections.ConfigDict) -> str:
    """Where the vocabulary is cached: ``vocab_dir``, else ``DATA_DIR/sentencepiece``."""
    if config.vocab_dir:
        return config.vocab_dir
    return os.path.join(config.data_dir or tfds.core.constants.DATA_DIR, 'sentencepiece')


def _load_split(config, split: str) -> list[tuple[str, str]]:
    verbosity = logging.get_verbosity()
    logging.set_verbosity(min(verbosity, logging.ERROR))  # TFDS's warnings bury the error
    try:
        pairs = data.load_pairs(config.dataset, split, config.data_dir,
                                src=config.source_lang, tgt=config.target_lang)
    finally:
        logging.set_verbosity(verbosity)
    if not pairs:
        raise errors.BadInputError(
            f'The {split} split of {config.dataset} has no {config.source_lang}-'
            f'{config.target_lang} pairs; check --config.source_lang and --config.target_lang.')
    return pairs


def _corpus_digest(pairs) -> str:
    digest = hashlib.sha256()
    for source, target in pairs:
        digest.update(source.encode())
        digest.update(b'\0')
        digest.update(target.encode())
        digest.update(b'\n')
    return digest.hexdigest()[:12]


def _fetch(x):
    """A (possibly multi-host) global array on this host, whole."""
    if jax.process_count() > 1:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Token ids of one split and its plan; the texts of an evaluation split."""

    src: list
    tgt: list
    plan: data.Plan
    pairs: list


class TranslationRun:
    """One run: the tokenised corpus, the model; builds the state, step and evaluation."""

    throughput_key = 'tokens_per_sec'

    def __init__(self, config: ml_collections.ConfigDict, mesh, num_shards: int):
        self.config = config
        self.mesh = mesh
        self.num_shards = num_shards
        train_pairs = _load_split(config, 'train')
        eval_pairs = _load_split(config, config.eval_split)
        lang = f'{config.dataset}_{config.source_lang}-{config.target_lang}'
        try:  # seed 0: every run of a corpus gets the same vocabulary
            self.tokenizer = tokenizer_lib.load_or_train(
                vocab_dir(config), f'{lang}_{_corpus_digest(train_pairs)}', config.vocab_size,
                lambda: data.texts(train_pairs))
        except OSError as e:
            raise errors.BadInputError(
                f'Cannot cache the vocabulary in {vocab_dir(config)} ({e.strerror}); set '
                '--config.vocab_dir to a folder you can write to.') from e
        self.train = self._corpus(train_pairs, config.batch_size, 'batch_size')
        self.eval = self._corpus(eval_pairs, config.eval_batch_size, 'eval_batch_size')
        logging.info('%d training pairs (%d kept), %d %s pairs, vocabulary of %d pieces.',
                     len(train_pairs), len(self.train.src), len(eval_pairs), config.eval_split,
                     self.tokenizer.vocab_size)
        plan = self.train.plan
        self.epoch_steps = plan.batches_per_epoch
        # Target tokens (EOS included) of an average batch: what the throughput counts.
        self.examples_per_step = sum(len(t) for t in self.train.tgt) / self.epoch_steps
        self.eval_name = config.eval_split
        self.headline = f'{self.eval_name}_bleu'
        self.sharded = distributed.sharded(mesh)
        self.input_shardings = (self.sharded,)
        self.model_config = model_config(config, self.tokenizer.vocab_size)
        self.graphdef, params, self.rest = steps.init_model(self.model_config, config.seed)
        self._params = params
        self._eval_step = jax.jit(steps.make_eval_step(self.graphdef,
                                                       smoothing=config.label_smoothing))
        self._workdir = None

    def _corpus(self, pairs, max_tokens: int, key: str) -> Corpus:
        config = self.config
        src, tgt = data.encode_pairs(self.tokenizer, pairs)
        keep = data.filter_by_length(src, tgt, config.max_source_positions,
                                     config.max_target_positions)
        if not len(keep):
            raise errors.ConfigError(
                f'No pair of {config.dataset} fits --config.max_source_positions='
                f'{config.max_source_positions} and --config.max_target_positions='
                f'{config.max_target_positions}; raise them.')
        src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
        try:
            plan = data.make_plan(src, tgt, max_tokens=max_tokens, row_multiple=self.num_shards,
                                  buckets=tuple(sorted(config.bucket_lengths)) or None)
        except ValueError as e:
            raise errors.ConfigError(
                f'--config.{key}={max_tokens} is too small: {e} ({self.num_shards} data shards '
                'need as many rows); raise it or lower --config.max_source_positions and '
                '--config.max_target_positions.') from e
        return Corpus(src, tgt, plan, [pairs[i] for i in keep])

    def init_state(self, tx) -> TrainState:
        return TrainState(jnp.zeros((), jnp.int32), self._params, tx.init(self._params))

    def make_train_step(self, tx, state):
        del state
        inner = steps.make_train_step(self.graphdef, tx, smoothing=self.config.label_smoothing)
        rest, seed = self.rest, self.config.seed

        def train_step(state, sums, batch):
            key = steps.dropout_key(seed, state.step)  # a function of (seed, step): resumable
            params, opt_state, step_metrics = inner(state.params, rest, state.opt_state, batch,
                                                    key)
            step_metrics = {**step_metrics, 'steps': 1.0}
            sums = {k: sums[k] + jnp.asarray(step_metrics[k], jnp.float32) for k in sums}
            return TrainState(state.step + 1, params, opt_state), sums

        return train_step

    def zero_metrics(self) -> dict:
        keys = ('steps', 'loss', 'loss_sum', 'nll_sum', 'tokens', 'grad_norm')
        return {k: jnp.zeros((), jnp.float32) for k in keys}

    def train_inputs(self, step: int) -> tuple:
        indices, length = self.train.plan.batch(step, self.config.seed)
        batch = data.make_batch(self.train.src, self.train.tgt, indices, length)
        return (distributed.put(batch, self.sharded),)

    def summarize_train(self, sums: dict) -> dict:
        sums = {k: float(v) for k, v in sums.items()}
        steps_, tokens = max(sums['steps'], 1.0), max(sums['tokens'], 1.0)
        return {'train_loss': sums['loss_sum'] / tokens,
                'train_perplexity': float(np.exp(sums['nll_sum'] / tokens)),
                'grad_norm': sums['grad_norm'] / steps_}

    def _put_eval(self, x):
        return distributed.put(x, self.sharded)

    def evaluate(self, state) -> dict:
        config, corpus, name = self.config, self.eval, self.eval_name
        put_step = lambda params, rest, batch: self._eval_step(params, rest,
                                                               self._put_eval(batch))
        scores = steps.evaluate(put_step, state.params, self.rest, corpus.src, corpus.tgt,
                                corpus.plan)
        count = config.bleu_examples or len(corpus.src)
        sources = corpus.src[:count]
        outputs = decode.translate(
            self.graphdef, state.params, self.rest, sources, max_tokens=config.eval_batch_size,
            beam_size=config.beam_size, length_penalty=config.length_penalty,
            row_multiple=self.num_shards, buckets=tuple(sorted(config.bucket_lengths)) or None,
            put=self._put_eval, fetch=_fetch)
        hypotheses = [self.tokenizer.decode(o) for o in outputs]
        references = [t for _, t in corpus.pairs[:count]]
        record = {f'{name}_loss': scores['loss'], f'{name}_nll': scores['nll'],
                  f'{name}_perplexity': scores['perplexity'],
                  f'{name}_bleu': bleu.corpus_bleu(hypotheses, references)}
        self._log_samples(int(jax.device_get(state.step)), record[f'{name}_bleu'],
                          [s for s, _ in corpus.pairs[:_NUM_SAMPLES]], hypotheses, references)
        return record

    def _log_samples(self, step, score, sources, hypotheses, references):
        text = (f'step {step}: {self.eval_name} BLEU {score:.2f}\n'
                f'{bleu.format_samples(sources, hypotheses, references, n=_NUM_SAMPLES)}\n')
        logging.info('Sample translations, %s', text)
        if self._workdir is not None:
            with open(os.path.join(self._workdir, SAMPLES_FILE), 'a') as f:
                f.write(text)

    def progress(self, record: dict) -> dict:
        return {'loss': f'{record["train_loss"]:.3f}',
                'tok_s': f'{record[self.throughput_key]:.0f}'}

    def save_artifacts(self, workdir: str) -> None:
        """The vocabulary (``spm.model``, to decode outputs later); remembers the workdir
        for the sample translations."""
        self._workdir = workdir
        with open(os.path.join(workdir, 'spm.model'), 'wb') as f:
            f.write(self.tokenizer.model_proto)

    def summary(self, config, history: list[dict]) -> dict:
        name, model = self.eval_name, self.model_config
        return {
            'dataset': config.dataset,
            'model': (f'transformer {model.encoder_layers}+{model.decoder_layers} layers, '
                      f'd_model {model.d_model}'),
            'language_pair': f'{config.source_lang}-{config.target_lang}',
            'eval_split': name,
            'vocab_size': self.tokenizer.vocab_size,
            'final_bleu': metrics.last(history, f'{name}_bleu'),
            'best_bleu': metrics.best(history, f'{name}_bleu'),
            'final_eval_loss': metrics.last(history, f'{name}_loss'),
            'final_eval_perplexity': metrics.last(history, f'{name}_perplexity'),
            'final_train_loss': metrics.last(history, 'train_loss'),
        }


TASK = runtime_task.Definition(
    name='translation', default_config=iwslt_de_en_transformer.get_config,
    check_config=check_config, load=TranslationRun)
# The runtime's whole config check and its run loop, on this task.
validate_config = TASK.validate_config
train_and_evaluate = TASK.train_and_evaluate
