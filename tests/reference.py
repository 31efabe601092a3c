"""Independent float64 NumPy reference of the two-pass algorithms.

Nothing here imports vasso_jax: the gradient of the test problem is derived by
hand, and each method's perturbation is written out from its paper.
"""

import numpy as np

LEAVES = ('w1', 'b1', 'w2')


def make_problem(seed=0, n=64, d_in=5, d_hidden=4, d_out=3):
    """A small tanh network, its data, and deterministic minibatch indices."""
    rng = np.random.default_rng(seed)
    params = {
        'w1': rng.normal(size=(d_in, d_hidden)) * 0.5,
        'b1': rng.normal(size=(d_hidden,)) * 0.1,
        'w2': rng.normal(size=(d_hidden, d_out)) * 0.5,
    }
    x = rng.normal(size=(n, d_in))
    y = rng.normal(size=(n, d_out))
    return params, x, y


def batches(num_steps, n=64, batch=16, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.choice(n, size=batch, replace=False) for _ in range(num_steps)]


def loss(params, x, y):
    h = np.tanh(x @ params['w1'] + params['b1'])
    r = h @ params['w2'] - y
    return 0.5 * np.mean(np.sum(r**2, axis=1))


def grad(params, x, y):
    """Hand-derived gradient of :func:`loss`."""
    z = x @ params['w1'] + params['b1']
    h = np.tanh(z)
    r = (h @ params['w2'] - y) / x.shape[0]
    dh = (r @ params['w2'].T) * (1.0 - h**2)
    return {'w1': x.T @ dh, 'b1': dh.sum(axis=0), 'w2': h.T @ r}


def norm(tree):
    return np.sqrt(sum(np.sum(tree[k] ** 2) for k in LEAVES))


def run(
    method,
    params,
    x,
    y,
    idx,
    *,
    rho,
    theta=1.0,
    eta=0.01,
    sigma=1.0,
    lmbda=0.9,
    lr=0.1,
    momentum=0.9,
    wd=1e-3,
    eps=1e-12,
    every_k=1,
    frozen=(),
):
    """Trains with `method` in {'sgd','sam','vasso','asam','fsam'}; returns the params.

    Leaves named in `frozen` are constants of the loss: zero gradient (so no part of the
    ascent) and never updated.
    """
    grad_at = lambda w, xb, yb: {
        k: np.zeros_like(v) if k in frozen else v for k, v in grad(w, xb, yb).items()
    }
    w = {k: np.array(v, np.float64) for k, v in params.items()}
    mom = {k: np.zeros_like(v) for k, v in w.items()}
    d = m = None
    for t, b in enumerate(idx):
        xb, yb = x[b], y[b]
        g = grad_at(w, xb, yb)
        if method == 'vasso':
            d = g if d is None else {k: (1 - theta) * d[k] + theta * g[k] for k in LEAVES}
            direction = d
        elif method == 'fsam':
            if m is None:
                direction, m = g, g
            else:
                direction = {k: g[k] - sigma * m[k] for k in LEAVES}
                m = {k: lmbda * m[k] + (1 - lmbda) * g[k] for k in LEAVES}
        else:
            direction = g
        if method != 'sgd' and rho > 0 and t % every_k == 0:
            if method == 'asam':
                tw = {k: np.abs(w[k]) + eta for k in LEAVES}
                scaled = {k: tw[k] * direction[k] for k in LEAVES}
                e = {k: rho * tw[k] * scaled[k] / (norm(scaled) + eps) for k in LEAVES}
            else:
                e = {k: rho * direction[k] / (norm(direction) + eps) for k in LEAVES}
            g = grad_at({k: w[k] + e[k] for k in LEAVES}, xb, yb)
        for k in LEAVES:
            if k in frozen:
                continue
            step = g[k] + wd * w[k]  # add_decayed_weights
            mom[k] = step + momentum * mom[k]  # optax.sgd's trace
            w[k] = w[k] - lr * mom[k]
    return w
