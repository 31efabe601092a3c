"""Machine translation, the paper's second task: a Transformer on IWSLT-like De->En.

The task-independent core, as small pure pieces a runtime task calls:

- `data`: sentence pairs through `tfds.data_source`, length filtering, token-budget batches
  over fixed length buckets (a pure function of the step);
- `tokenizer`: the joint SentencePiece vocabulary, trained once and cached;
- `model`: the NNX encoder-decoder Transformer, its label-smoothed loss and KV cache;
- `steps`: the optimizer (a SAM / VaSSO link before AdamW), train and eval steps;
- `decode`: greedy and beam search, and `translate` for a whole corpus;
- `bleu`: detokenised corpus BLEU and sample translations;
- `task`: the runtime's second task (`TASK`), behind `python -m experiments.train`.
(`experiments/benchmarks/translation.py` times the step of AdamW, SAM and VaSSO.)
"""
