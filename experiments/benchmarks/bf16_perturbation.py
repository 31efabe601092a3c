r"""How much of a SAM perturbation survives in bfloat16 params.

For params ``w`` of one dtype, the link computes ``epsilon = rho g / ||g||`` in float32 and hands
``grad_fn`` the point ``w + epsilon``. Formed in bfloat16 (``perturbed_dtype=jnp.bfloat16``, the
behaviour before the fix), the sum is rounded to 8 significant bits and a perturbation smaller
than half a bfloat16 ulp of ``w`` vanishes. Formed in float32 (the default), it survives. This
script measures the *realised* perturbation ``point - w`` against the intended ``epsilon``:
its cosine and the fraction of coordinates that moved at all.

Usage:
  python -m experiments.benchmarks.bf16_perturbation              # 1M params, ~10 s on CPU
  python -m experiments.benchmarks.bf16_perturbation --size 10000
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import vasso_jax


def realised(w, g, rho, perturbed_dtype):
    """Returns (intended epsilon, realised point - w), both float64 NumPy arrays."""
    link = vasso_jax.sam(rho, keep_perturbation=True, perturbed_dtype=perturbed_dtype)
    seen = []

    def grad_fn(p):
        seen.append(p)
        return jnp.zeros_like(p)

    _, state = link.update(g, link.init(w), w, grad_fn=grad_fn)
    intended = np.asarray(state.perturbation, np.float64)
    moved = np.asarray(seen[0], np.float64) - np.asarray(w, np.float64)
    return intended, moved


def measure(size=1_000_000, scale=0.02, offset=0.0, rho=0.05, seed=0):
    """Cosine and fraction of coordinates moved, per route, for bfloat16 params.

    ``w = offset + scale * N(0, 1)`` in bfloat16; ``g ~ N(0, 1)``.
    """
    kw, kg = jax.random.split(jax.random.key(seed))
    w = (offset + scale * jax.random.normal(kw, (size,))).astype(jnp.bfloat16)
    g = jax.random.normal(kg, (size,)).astype(jnp.bfloat16)
    rows = {}
    for name, dtype in (('float32 point (default)', None), ('bfloat16 point', jnp.bfloat16)):
        intended, moved = realised(w, g, rho, dtype)
        cosine = moved @ intended / (np.linalg.norm(moved) * np.linalg.norm(intended) + 1e-300)
        target = intended != 0
        rows[name] = {
            'cosine': float(cosine),
            'moved': float(np.mean(moved[target] != 0)),
            'norm_ratio': float(np.linalg.norm(moved) / np.linalg.norm(intended)),
        }
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=1_000_000)
    parser.add_argument('--rho', type=float, default=0.05)
    args = parser.parse_args(argv)
    print('| params | point | cosine(realised, intended) | coordinates moved | norm ratio |')
    print('|---|---|---|---|---|')
    settings = (('w ~ 0.02 N(0,1)', 0.02, 0.0), ('w ~ 1 + 0.02 N(0,1)', 0.02, 1.0))
    for label, scale, offset in settings:
        for route, r in measure(args.size, scale, offset, args.rho).items():
            print(
                f"| {label} | {route} | {r['cosine']:.4f} | {100 * r['moved']:.1f}% "
                f"| {r['norm_ratio']:.3f} |"
            )


if __name__ == '__main__':
    main()
