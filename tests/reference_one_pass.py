"""Independent float64 NumPy reference of the one-pass algorithms.

Nothing here imports vasso_jax. It runs the recursion in the unperturbed weights
``w`` and the perturbation ``e`` separately (the library only holds ``w + e``), with
the base ``chain(add_decayed_weights(wd), sgd(lr, momentum))`` written out, and
Momentum-SAM in the paper's own form (perturb by ``-rho v / ||v||``).
"""

import numpy as np

from tests import reference

LEAVES = reference.LEAVES


def run(method, params, x, y, idx, *, rhos, theta=0.4, lr=0.1, momentum=0.9, wd=1e-3, eps=1e-12):
    """One-pass `method` in {'vasso', 'msam'}; ``rhos[k]`` makes the perturbation of step k+1.

    Returns, for each step, a dict: ``held`` and ``w`` (the params ``w + e`` and ``w``
    after the step), ``grad_norm`` (of the step's gradient) and ``cosine`` (between that
    gradient and the perturbation it was taken at; 0 when unperturbed).
    """
    w = {k: np.array(v, np.float64) for k, v in params.items()}
    e = {k: np.zeros_like(v) for k, v in w.items()}
    mom = {k: np.zeros_like(v) for k, v in w.items()}
    d = None
    out = []
    for t, b in enumerate(idx):
        g = reference.grad({k: w[k] + e[k] for k in LEAVES}, x[b], y[b])  # the only gradient
        e_norm = reference.norm(e)
        cosine = sum(np.sum(g[k] * e[k]) for k in LEAVES) / (reference.norm(g) * e_norm or 1.0)
        for k in LEAVES:
            mom[k] = g[k] + wd * w[k] + momentum * mom[k]
            w[k] = w[k] - lr * mom[k]
        if method == 'vasso':
            d = g if d is None else {k: (1 - theta) * d[k] + theta * g[k] for k in LEAVES}
            e = {k: rhos[t] * d[k] / (reference.norm(d) + eps) for k in LEAVES}
        elif method == 'msam':
            e = {k: -rhos[t] * mom[k] / reference.norm(mom) for k in LEAVES}
        else:
            raise ValueError(method)
        out.append(
            {
                'held': {k: w[k] + e[k] for k in LEAVES},
                'w': {k: w[k].copy() for k in LEAVES},
                'grad_norm': reference.norm(g),
                'cosine': cosine,
            }
        )
    return out
