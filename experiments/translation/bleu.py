"""Detokenised corpus BLEU with sacrebleu, and a few sample translations for the log.

BLEU is computed on detokenised text (SentencePiece decoded) with sacrebleu's default
``13a`` tokenisation, so it is comparable across vocabularies; fairseq's IWSLT14 numbers
(tokenised, compound-split BLEU) run about one point higher.
"""

from collections.abc import Callable, Sequence

import numpy as np
import sacrebleu


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) of ``hypotheses`` against one reference each."""
    if len(hypotheses) != len(references):
        raise ValueError(f'{len(hypotheses)} hypotheses for {len(references)} references;'
                         ' translate every reference sentence once.')
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def detokenize(decode: Callable[[np.ndarray], str], tokens) -> list[str]:
    """Each row of ``tokens`` (ids, EOS-terminated) decoded to text by ``decode``."""
    return [decode(np.asarray(row)) for row in tokens]


def format_samples(sources: Sequence[str], hypotheses: Sequence[str],
                   references: Sequence[str], n: int = 3) -> str:
    """The first ``n`` triples as an indented block: ``S:`` source, ``H:`` output, ``T:`` target."""
    lines = []
    for i, (s, h, r) in enumerate(zip(sources, hypotheses, references)):
        if i == n:
            break
        lines += [f'[{i}] S: {s}', f'    H: {h}', f'    T: {r}']
    return '\n'.join(lines)
