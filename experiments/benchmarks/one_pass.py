"""Step time of SGD-momentum, two-pass VaSSO and one-pass VaSSO/MSAM on a small CNN.

Not a test: a quick, interleaved measurement (each round times every method once, so
load from other processes hits all of them alike). Prints the median and the fastest
step time and the compiled step's FLOPs (XLA's cost analysis: load-independent), each
with its ratio to SGD.

    python -m experiments.benchmarks.one_pass --rounds 15 --steps 10 --batch 128
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import vasso_jax


def init_cnn(key, channels=(16, 32), classes=10):
    k1, k2, k3 = jax.random.split(key, 3)
    c1, c2 = channels
    return {
        'conv1': jax.random.normal(k1, (3, 3, 3, c1)) * (2 / 27) ** 0.5,
        'conv2': jax.random.normal(k2, (3, 3, c1, c2)) * (2 / (9 * c1)) ** 0.5,
        'dense': jax.random.normal(k3, (c2, classes)) * c2**-0.5,
        'bias': jnp.zeros(classes),
    }


def loss_fn(params, images, labels):
    dims = ('NHWC', 'HWIO', 'NHWC')
    h = jax.lax.conv_general_dilated(
        images, params['conv1'], (1, 1), 'SAME', dimension_numbers=dims
    )
    h = jax.nn.relu(h)
    h = jax.lax.conv_general_dilated(h, params['conv2'], (2, 2), 'SAME', dimension_numbers=dims)
    h = jax.nn.relu(h).mean(axis=(1, 2))
    logits = h @ params['dense'] + params['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def base():
    return optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))


def make_steps():
    def plain(tx):
        def step(params, state, images, labels):
            grads = jax.grad(loss_fn)(params, images, labels)
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        return tx, step

    def two_pass(tx):
        def step(params, state, images, labels):
            grad_fn = lambda p: jax.grad(loss_fn)(p, images, labels)
            updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
            return optax.apply_updates(params, updates), state

        return tx, step

    return {
        'sgd_momentum': plain(base()),
        'vasso_two_pass': two_pass(optax.chain(vasso_jax.vasso(rho=0.1, theta=0.4), base())),
        'vasso_one_pass': plain(vasso_jax.one_pass_vasso(base(), rho=0.1, theta=0.4)),
        'msam_one_pass': plain(vasso_jax.one_pass_momentum_sam(base(), rho=0.3)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--steps', type=int, default=10, help='steps timed per round')
    parser.add_argument('--batch', type=int, default=128)
    args = parser.parse_args()

    images = jax.random.normal(jax.random.key(1), (args.batch, 32, 32, 3))
    labels = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
    runs, flops = {}, {}
    for name, (tx, step) in make_steps().items():
        params = init_cnn(jax.random.key(0))
        state = tx.init(params)
        step = jax.jit(step, donate_argnums=(0, 1))
        cost = step.lower(params, state, images, labels).compile().cost_analysis()
        flops[name] = (cost[0] if isinstance(cost, list) else cost).get('flops', float('nan'))
        params, state = jax.block_until_ready(step(params, state, images, labels))  # compile
        runs[name] = [step, params, state, []]

    for _ in range(args.rounds):
        for run in runs.values():
            step, params, state, times = run
            start = time.perf_counter()
            for _ in range(args.steps):
                params, state = step(params, state, images, labels)
            jax.block_until_ready((params, state))
            times.append((time.perf_counter() - start) / args.steps)
            run[1], run[2] = params, state

    sgd = statistics.median(runs['sgd_momentum'][3])
    print(f'{jax.devices()[0].platform}, batch {args.batch}, {args.rounds} rounds x {args.steps}')
    sgd_min = min(runs['sgd_momentum'][3])
    columns = ('median ms/step', 'vs SGD', 'min ms/step', 'vs SGD', 'XLA MFLOP', 'vs SGD')
    print(f'{"method":16s} ' + ' '.join(f'{c:>9s}' for c in columns))
    for name, run in runs.items():
        median, fastest = statistics.median(run[3]), min(run[3])
        print(
            f'{name:16s} {1e3 * median:14.2f} {median / sgd:9.2f} '
            f'{1e3 * fastest:11.2f} {fastest / sgd_min:9.2f} '
            f'{flops[name] / 1e6:9.1f} {flops[name] / flops["sgd_momentum"]:9.2f}'
        )


if __name__ == '__main__':
    main()
