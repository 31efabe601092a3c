r"""Lanczos on XLA:CPU: Hessian-vector products in a ``while_loop`` against unrolled steps.

``vasso_jax.hessian_top_eigenvalue`` runs its Hessian-vector products (HVPs) in a
``lax.while_loop`` by default; ``unroll=True`` traces them as straight-line code. Inside a
loop body XLA:CPU leaves convolutions on a generic loop emitter instead of its Eigen kernels
(jax#12868; BENCHMARKS.md, "Where the time goes"). This script times the measurement of the
grid diagnostics (``experiments.study.diagnose``: Lanczos on the mean cross-entropy of 256
training images, model in evaluation mode) both ways on the Fashion-MNIST study's CNN with
random weights and images, the two variants interleaved, plus one HVP at top level.

Usage:
  python -m experiments.benchmarks.hessian_loop              # the study's CNN, a few minutes
  python -m experiments.benchmarks.hessian_loop --tiny       # checks the code: seconds
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import vasso_jax
from experiments.benchmarks import harness, measure
from experiments.image_classification import steps

# The model of the Fashion-MNIST study (experiments/configs/fashion_mnist_noise.py).
STUDY_CNN = harness.ModelSpec('CNN of the Fashion-MNIST study (28x28x1)', 'cnn',
                              {'width': 16, 'hidden': 128})


def make_loss(spec: harness.ModelSpec, image_shape, num_examples: int, seed: int = 0):
    """``(loss(params), params)``: mean cross-entropy of random images, evaluation mode."""
    model = spec.build(10)
    k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    images = jax.random.normal(k_x, (num_examples, *image_shape), jnp.float32)
    labels = jax.random.randint(k_y, (num_examples,), 0, 10)
    variables = model.init(k_init, images[:1], train=False)

    def loss(params):
        logits = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                             images, train=False)
        return jnp.mean(steps.cross_entropy(logits, labels, 10))

    return loss, variables['params']


def run(spec: harness.ModelSpec, image_shape, *, num_examples: int, num_iters: int,
        rounds: int) -> dict[str, dict]:
    """Per variant: first call (compile + run) and median run seconds, the eigenvalue."""
    loss, params = make_loss(spec, image_shape, num_examples)
    hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])
    variants = {
        'while_loop (default)': jax.jit(lambda p: vasso_jax.hessian_top_eigenvalue(
            loss, p, num_iters=num_iters)),
        'unroll=True': jax.jit(lambda p: vasso_jax.hessian_top_eigenvalue(
            loss, p, num_iters=num_iters, unroll=True)),
        'one HVP, top level': lambda p: hvp(p, p),
    }
    rows = {}
    for name, fn in variants.items():
        start = time.perf_counter()
        value = jax.block_until_ready(fn(params))
        rows[name] = {'first_s': time.perf_counter() - start,
                      'value': float(value) if name != 'one HVP, top level' else None}
    times = measure.interleaved_rounds(
        {name: lambda fn=fn: jax.block_until_ready(fn(params)) for name, fn in variants.items()},
        rounds)
    for name, seconds in times.items():
        rows[name]['median_s'] = float(np.median(seconds))
    unrolled = times['unroll=True']
    for name, seconds in times.items():
        rows[name]['x_unrolled'] = measure.median_ratio(seconds, unrolled)
    return rows


def table(rows: dict[str, dict], num_iters: int) -> str:
    lines = ['| variant | first call (s) | median run (s) | per HVP (s) | x unrolled | '
             'top eigenvalue |', '|---|---:|---:|---:|---:|---:|']
    for name, r in rows.items():
        hvps = 1 if name == 'one HVP, top level' else num_iters
        value = '—' if r['value'] is None else f'{r["value"]:.6g}'
        lines.append(f'| {name} | {r["first_s"]:.2f} | {r["median_s"]:.3f} | '
                     f'{r["median_s"] / hvps:.3f} | {r["x_unrolled"]:.2f} | {value} |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tiny', action='store_true', help='a small CNN on 8x8 images')
    parser.add_argument('--num_iters', type=int, default=5, help='Lanczos steps')
    parser.add_argument('--num_examples', type=int, default=256)
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args(argv)
    spec, shape = (harness.TINY, (8, 8, 1)) if args.tiny else (STUDY_CNN, (28, 28, 1))
    rows = run(spec, shape, num_examples=args.num_examples, num_iters=args.num_iters,
               rounds=args.rounds)
    info = measure.machine_description()
    print(f'{spec.label}, {args.num_examples} examples, {args.num_iters} Lanczos steps, '
          f'{args.rounds} interleaved rounds; {info["cpu"]}; {info["device"]}; '
          f'{info["versions"]}; load average {measure.load_average()}\n')
    print(table(rows, args.num_iters))
    return rows


if __name__ == '__main__':
    main()
