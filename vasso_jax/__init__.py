"""vasso_jax: sharpness-aware optimisation (SAM, VaSSO, ASAM, F-SAM) for optax.

Every method is the first link of an ``optax.chain``: it turns the minibatch
gradient at ``w`` into the gradient at the adversarially perturbed ``w + eps``.

    tx = optax.chain(vasso_jax.vasso(rho=0.1, theta=0.4),
                     optax.add_decayed_weights(5e-4),
                     optax.sgd(0.05, momentum=0.9))
    updates, state = tx.update(grads, state, params, grad_fn=grad_on_same_batch)
"""

from vasso_jax._accumulation import microbatched
from vasso_jax._aliases import asam, friendly_sam, sam, vasso
from vasso_jax._diagnostics import (
    PerturbationStability,
    PerturbationStabilityState,
    cosine_similarity,
    hessian_top_eigenpair,
    hessian_top_eigenvalue,
    m_sharpness,
    perturbation_stability,
)
from vasso_jax._directions import (
    FriendlyDirectionState,
    VassoDirectionState,
    friendly_direction,
    gradient_direction,
    vasso_direction,
)
from vasso_jax._monitor import StabilityMonitorState, track_stability
from vasso_jax._one_pass import (
    OnePassState,
    one_pass,
    one_pass_momentum_sam,
    one_pass_vasso,
    unperturbed_params,
)
from vasso_jax._parallel import device_varying
from vasso_jax._sharpness import SharpnessAwareState, sharpness_aware

__version__ = '0.1.0'

__all__ = (
    'FriendlyDirectionState',
    'OnePassState',
    'PerturbationStability',
    'PerturbationStabilityState',
    'SharpnessAwareState',
    'StabilityMonitorState',
    'VassoDirectionState',
    'asam',
    'cosine_similarity',
    'device_varying',
    'friendly_direction',
    'friendly_sam',
    'gradient_direction',
    'hessian_top_eigenpair',
    'hessian_top_eigenvalue',
    'm_sharpness',
    'microbatched',
    'one_pass',
    'one_pass_momentum_sam',
    'one_pass_vasso',
    'perturbation_stability',
    'sam',
    'sharpness_aware',
    'track_stability',
    'unperturbed_params',
    'vasso',
    'vasso_direction',
)
