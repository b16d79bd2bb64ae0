"""A mass learned during burn-in (engine.learned_mass): the estimator, its freezing, and BAOAB with it.

References are exact: the regularised sample covariance of each window (the estimator is exactly
Welford's), the Wishart spread of a sample covariance of iid draws, and — for chains — the
between-chain spread of per-chain estimates. Each statistical check is also shown to reject a
perturbed reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from bayesflow.engine import Block, Scalar, SDEConfig, Splitting, build, hamiltonian_curl
from bayesflow.engine.learned_mass import LearnedMass
from bayesflow.engine.learned_operators import BurnInStep, LearnedRoot
from bayesflow.sgmcmc import baoab, sghmc

DTYPE = torch.float64


def rotated(precision_eigs, angle=math.pi / 6):
    """Σ of a 2-D Gaussian whose precision has eigenvalues ``precision_eigs``, rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s], [s, c]], dtype=DTYPE)
    return rot @ torch.diag(1.0 / torch.tensor(precision_eigs, dtype=DTYPE)) @ rot.T


def random_cov(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DTYPE))
    return q @ torch.diag(torch.logspace(0, 2, d, dtype=DTYPE)) @ q.T


def regularised(cov, n, jitter):
    """Stan's regularisation, scale-free: (n Σ + 5 ε mean-variance I) / (n + 5)."""
    w = n / (n + 5.0)
    return w * cov + (1 - w) * jitter * cov.diagonal().mean() * torch.eye(len(cov), dtype=DTYPE)


def feed(mass, draws, chains=None):
    """Absorb ``draws`` (steps, [K,] d) as θ_0, θ_1, ... and return the statistics."""
    statistics = mass.init([draws[0]])
    numel = draws.shape[-1]
    for t, x in enumerate(draws):
        mass.absorb(statistics, [x], t, numel=numel)
    return statistics


def wishart_statistic(estimate, cov, n):
    """(n/2)·|Σ^{-1/2} Σ̂ Σ^{-1/2} − I|²_F: ≈ χ² with d(d+1)/2 degrees of freedom for a sample covariance."""
    e, v = torch.linalg.eigh(cov)
    inv_root = (v / e.sqrt()) @ v.T
    return 0.5 * n * ((inv_root @ estimate @ inv_root - torch.eye(len(cov), dtype=DTYPE)) ** 2).sum().item()


# ----- the estimator -----------------------------------------------------------------------------
def test_dense_estimate_is_the_regularised_covariance_of_each_window():
    mass = LearnedMass("dense", burn_in=300, windows=2)
    assert mass.ends == [100, 300]
    draws = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE) * torch.tensor(
        [1.0, 2.0, 3.0], dtype=DTYPE)
    statistics = mass.init([draws[0]])
    for t, x in enumerate(draws):
        mass.absorb(statistics, [x], t, numel=3)
        if t == 99:  # the first window's estimate, from its 100 draws alone
            torch.testing.assert_close(mass.covariance(statistics), regularised(torch.cov(draws[:100].T), 100, 1e-3))
        if t < 99:
            torch.testing.assert_close(mass.covariance(statistics), torch.eye(3, dtype=DTYPE))  # the initial I
    torch.testing.assert_close(mass.covariance(statistics), regularised(torch.cov(draws[100:].T), 200, 1e-3))
    torch.testing.assert_close(statistics[0], draws[100:].mean(0))


def test_dense_estimate_converges_to_a_rotated_covariance_within_wishart_error():
    d, n = 5, 4000
    cov = random_cov(d, seed=1)
    draws = torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=DTYPE) @ torch.linalg.cholesky(cov).T
    mass = LearnedMass("dense", burn_in=n, windows=1)
    estimate = mass.covariance(feed(mass, draws))
    dof = d * (d + 1) / 2  # χ² mean 15, sd √30: 6 sd above the mean is a false alarm of < 1e-6
    assert wishart_statistic(estimate, cov, n) < dof + 6 * math.sqrt(2 * dof)
    assert wishart_statistic(estimate, 1.1 * cov, n) > dof + 6 * math.sqrt(2 * dof)  # a 10 % error is seen


def test_diagonal_estimate_converges_to_the_diagonal_of_a_rotated_covariance():
    d, n = 6, 4000
    cov = random_cov(d, seed=3)
    draws = torch.randn(n, d, generator=torch.Generator().manual_seed(4), dtype=DTYPE) @ torch.linalg.cholesky(cov).T
    mass = LearnedMass("diag", burn_in=n, windows=1)
    variances = mass.covariance(feed(mass, draws))[0]
    sd = cov.diagonal() * math.sqrt(2.0 / n)  # the spread of a sample variance
    assert ((variances - cov.diagonal()).abs() / sd).max() < 4.5
    assert ((variances - 1.1 * cov.diagonal()).abs() / sd).max() > 4.5


def test_pooled_chains_share_the_covariance_of_all_their_samples():
    K, n, d = 4, 200, 3
    draws = torch.randn(n, K, d, generator=torch.Generator().manual_seed(5), dtype=DTYPE)
    for kind in ("dense", "diag"):
        mass = LearnedMass(kind, burn_in=n, windows=1, chains=K, pool=True)
        statistics = mass.init([draws[0]])
        for t, x in enumerate(draws):
            mass.absorb(statistics, [x], t, numel=d)
        pooled = regularised(torch.cov(draws.reshape(-1, d).T), n * K, 1e-3)
        if kind == "dense":
            torch.testing.assert_close(mass.covariance(statistics), pooled.expand(K, d, d))
        else:
            torch.testing.assert_close(mass.covariance(statistics)[0], pooled.diagonal().expand(K, d))


# ----- burn-in and freezing ----------------------------------------------------------------------
def gaussian_transform(cov, mass, lr, chains, gamma=1.0, burn_in_lr=None):
    precision = torch.linalg.inv(cov)

    def log_posterior(p, batch):  # batched: p is (K, d)
        return -0.5 * ((p @ precision) * p).sum(-1), None

    step = lr if burn_in_lr is None else BurnInStep(burn_in_lr, 0.75 * lr, lr, mass.rough_until, mass.burn_in)
    curl = hamiltonian_curl(1.0) if mass is None else mass.curl()
    config = SDEConfig(step_size=step, diffusion=Block({("momenta", "momenta"): Scalar(gamma)}), curl=curl,
                       integrator=Splitting("BAOAB"), temperature=1.0)
    return build(log_posterior, config, chains=chains, vectorize="batched")


def test_the_mass_is_frozen_after_burn_in_and_functional_during_it():
    cov = rotated([1.0, 10.0])
    mass = LearnedMass("dense", burn_in=40, windows=2, chains=3)
    transform = gaussian_transform(cov, mass, lr=0.3, chains=3)
    state = transform.init(torch.zeros(3, 2, dtype=DTYPE), seed=0)
    for _ in range(10):
        before = [t.clone() for t in state.preconditioner[0]]
        new, _ = transform.update(state, None)  # functional during burn-in: the old state is untouched
        assert all(torch.equal(a, b) for a, b in zip(before, state.preconditioner[0]))
        state = new
    for _ in range(30):
        state, _ = transform.update(state, None, inplace=True)
    frozen = [t.clone() for t in state.preconditioner[0]]
    assert not torch.equal(frozen[2], torch.eye(2, dtype=DTYPE).expand(3, 2, 2))  # learned, not the initial I
    objects = state.preconditioner[0]
    for inplace in (True, False):
        for _ in range(20):
            state, _ = transform.update(state, None, inplace=inplace)
        assert all(a is b for a, b in zip(state.preconditioner[0], objects))  # not even copied
        assert all(torch.equal(a, b) for a, b in zip(state.preconditioner[0], frozen))
    far = [1e6 * torch.ones(3, 2, dtype=DTYPE)]
    mass.absorb(state.preconditioner[0], far, 40, numel=2)  # θ after burn-in never reaches the mass
    assert all(torch.equal(a, b) for a, b in zip(state.preconditioner[0], frozen))
    assert mass.curl().state_dependent is False and mass.diffusion().divergence(None) is None  # Γ = 0


# ----- BAOAB with the learned mass ---------------------------------------------------------------
def run(transform, x0, steps, burn):
    state = transform.init(x0, seed=1)
    samples = torch.empty(steps - burn, *x0.shape, dtype=DTYPE)
    for t in range(steps):
        state, _ = transform.update(state, None, inplace=True)
        if t >= burn:
            samples[t - burn] = state.params
    return samples, state


def per_chain_w2(samples, cov):
    """Mean over chains of W2(Gaussian fit of the chain, N(0, Σ)) / √tr Σ."""
    root = _sqrtm(cov)
    errors = []
    for k in range(samples.shape[1]):
        x = samples[:, k]
        fit = torch.cov(x.T)
        cross = _sqrtm(root @ fit @ root).trace()
        errors.append(((x.mean(0) ** 2).sum() + fit.trace() + cov.trace() - 2 * cross).clamp_min(0).sqrt())
    return (torch.stack(errors) / cov.trace().sqrt()).mean().item()


def _sqrtm(matrix):
    e, v = torch.linalg.eigh(matrix)
    return (v * e.clamp_min(0).sqrt()) @ v.T


def test_baoab_with_a_learned_dense_mass_samples_a_stiff_rotated_gaussian_and_mixes_faster():
    K, steps, burn = 32, 1600, 400
    cov = rotated([1.0, 100.0])  # condition 100, rotated 30°: a diagonal mass cannot whiten it
    x0 = 2 * torch.randn(K, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE) @ _sqrtm(cov)
    mass = LearnedMass("dense", burn_in=burn, chains=K)
    learned, state = run(gaussian_transform(cov, mass, lr=1.0, chains=K, burn_in_lr=0.1), x0, steps, burn)
    # the frozen mass whitens the target: Σ^{-1/2} S² Σ^{-1/2} ≈ I on average over the chains (the last
    # window's 229 correlated draws bias a sample covariance by ≈ −τ/n ≈ −5 %, the shrinkage n/(n + 5) by
    # −2 %; the between-chain standard error is ≈ 3 %), and roughly in every chain (the identity: 0.01, 1)
    inv_root = torch.linalg.inv(_sqrtm(cov))
    whitened = inv_root @ mass.covariance(state.preconditioner[0]) @ inv_root
    assert (whitened.mean(0) - torch.eye(2, dtype=DTYPE)).abs().max() < 0.15, whitened.mean(0)
    eigenvalues = torch.linalg.eigvalsh(whitened)
    assert eigenvalues.min() > 0.2 and eigenvalues.max() < 3.0, eigenvalues
    # exact stationary covariance (BAOAB is exact on Gaussians): per-chain whitened estimates, their
    # mean against I with the between-chain standard error (autocorrelation included)
    per_chain = torch.stack([inv_root @ torch.cov(learned[:, k].T) @ inv_root for k in range(K)])
    for reference in (torch.eye(2, dtype=DTYPE), 1.1 * torch.eye(2, dtype=DTYPE)):
        z = (per_chain.mean(0) - reference) / (per_chain.std(0) / math.sqrt(K))
        assert (z.abs().max() < 4.5) == (reference[0, 0] == 1.0), z
    # better mixing than the identity mass at its own good step (h·√λ_max = 1.6), at equal gradients
    identity, _ = run(gaussian_transform(cov, None, lr=0.16, chains=K), x0, steps, burn)
    w2_learned, w2_identity = per_chain_w2(learned, cov), per_chain_w2(identity, cov)
    assert w2_learned < 0.6 * w2_identity, (w2_learned, w2_identity)


def test_presets_take_a_learned_mass():
    cov = rotated([1.0, 4.0])
    precision = torch.linalg.inv(cov)

    def log_posterior(p, batch):
        return -0.5 * p @ precision @ p, None

    for preset in (baoab, sghmc):
        mass = LearnedMass("diag", burn_in=50, windows=1)
        transform = preset.build(log_posterior, lr=0.5, alpha=1.0, mass=mass, burn_in_lr=0.1)
        assert transform.config.step_size == BurnInStep(0.1, 0.375, 0.5, 50, 50)  # one window: no settling stage
        assert transform.config.curl.get("params", "momenta") == LearnedRoot(mass, -1.0)
        state = transform.init(torch.zeros(2, dtype=DTYPE), seed=0)
        for _ in range(60):
            state, _ = transform.update(state, None, inplace=True)
        assert bool(torch.isfinite(state.params).all())
        assert preset.config(lr=0.5, mass=mass).step_size == 0.5  # no burn_in_lr: lr throughout
    with pytest.raises(ValueError, match="beta > 0 needs a constant lr"):
        sghmc.config(lr=0.5, alpha=1.0, beta=0.1, mass=LearnedMass("diag", burn_in=50), burn_in_lr=0.1)


def test_learned_diffusion_is_sigma_hat_with_root_s():
    """SGLD with D = Σ̂: at T = 0 one step is θ + h·Σ̂·∇ℓ; at T > 0 its noise is √(2Th)·S ξ, Cov 2Th·Σ̂."""
    K, h, initial = 4000, 0.1, torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DTYPE)
    mass = LearnedMass("dense", burn_in=1000, initial=initial, chains=K)  # S = initial^{1/2} until window 1 ends

    def log_posterior(p, batch):
        return -0.5 * (p**2).sum(-1), None

    for T in (0.0, 1.0):
        transform = build(log_posterior, SDEConfig(step_size=h, diffusion=mass.diffusion(), temperature=T),
                          chains=K, vectorize="batched")
        x0 = torch.ones(K, 2, dtype=DTYPE)
        step = transform.update(transform.init(x0, seed=0), None)[0].params - (x0 - h * x0 @ initial)
        if T == 0.0:
            torch.testing.assert_close(step, torch.zeros_like(step))
        else:
            cov = torch.cov(step.T) / (2 * T * h)
            sd = (initial**2 + initial.diagonal()[:, None] * initial.diagonal()[None, :]).sqrt() / math.sqrt(K)
            assert ((cov - initial).abs() / sd).max() < 4.5
            assert ((cov - 1.25 * initial).abs() / sd).max() > 4.5


# ----- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"burn_in": 0}, "burn_in must be a positive integer"),
    ({"burn_in": -5}, "burn_in must be a positive integer"),
    ({"burn_in": 10.5}, "burn_in must be a positive integer"),
    ({"kind": "full"}, "unknown kind 'full'"),
    ({"windows": 0}, "windows must be a positive integer"),
    ({"burn_in": 5, "windows": 3}, "too short"),
    ({"jitter": -1.0}, "jitter must be a non-negative"),
    ({"initial": -1.0}, "positive finite number"),
    ({"initial": torch.tensor([[1.0, 2.0], [2.0, 1.0]])}, "positive semi-definite"),
    ({"initial": torch.tensor([[1.0, 0.5], [0.0, 1.0]])}, "symmetric"),
    ({"initial": torch.tensor([[1.0, math.nan], [math.nan, 1.0]])}, "finite"),
    ({"kind": "diag", "initial": torch.tensor([1.0, -1.0])}, "non-negative variances"),
    ({"pool": True}, "give chains=K"),
    ({"chains": 0}, "chains must be a positive integer"),
])
def test_bad_arguments_are_refused(kwargs, match):
    arguments = {"kind": "dense", "burn_in": 100, **kwargs}
    with pytest.raises(ValueError, match=match):
        LearnedMass(arguments.pop("kind"), **arguments)


def test_mismatched_chains_and_placement_are_refused():
    def log_posterior(p, batch):
        return -0.5 * (p**2).sum(), None

    config = SDEConfig(step_size=0.1, diffusion=Block({("momenta", "momenta"): Scalar(1.0)}),
                       curl=LearnedMass("dense", burn_in=30).curl(), integrator=Splitting("BAOAB"))
    transform = build(log_posterior, config, chains=4)
    with pytest.raises(ValueError, match="build it with chains=4"):
        transform.update(transform.init(torch.zeros(4, 2), seed=0), None)
    with pytest.raises(ValueError, match=r"lead with 3 chains"):
        LearnedMass("dense", burn_in=30, chains=3).init([torch.zeros(4, 2)])
    with pytest.raises(ValueError, match="initial covariance has shape"):
        LearnedMass("dense", burn_in=30, initial=torch.eye(3)).init([torch.zeros(2)])
    bad = SDEConfig(step_size=0.1, curl=Block({("params", "params"): LearnedRoot(LearnedMass("diag", 30), 1.0)}))
    with pytest.raises(ValueError, match="off the diagonal of the curl"):
        build(log_posterior, bad).init(torch.zeros(2))
    with pytest.raises(TypeError, match="must be a LearnedMass"):
        baoab.config(lr=0.1, mass="dense")
    with pytest.raises(ValueError, match="give mass=LearnedMass"):
        baoab.config(lr=0.1, burn_in_lr=0.01)


def test_a_diverged_window_raises_a_clear_error():
    """A chain that diverged within a window (an infinite draw the engine's value check did not see,
    e.g. with check_finite="none") gives a FloatingPointError naming the cause, not eigh's LinAlgError."""
    mass = LearnedMass("dense", burn_in=10, windows=1, jitter=0.0)
    statistics = mass.init([torch.zeros(2, dtype=torch.float64)])
    draws = torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    draws[4, 1] = math.inf
    with pytest.raises(FloatingPointError, match="diverged while the mass was learned"):
        for t, x in enumerate(draws):
            mass.absorb(statistics, [x], t, numel=2)


# ----- the gradient-informed estimate (θ and ∇H together) ----------------------------------------
def feed_pairs(mass, draws, grads):
    """Hand the mass (θ_t, ∇H(θ_t)) as the engine does: the gradient first, then θ_t."""
    statistics = mass.init([draws[0]])
    for t, (x, g) in enumerate(zip(draws, grads)):
        statistics = mass.update_state(statistics, [g], t, inplace=True)
        mass.absorb(statistics, [x], t, numel=draws.shape[-1])
    return statistics


@pytest.mark.parametrize("temperature", [1.0, 1e-3])
def test_gradient_informed_dense_estimate_is_exact_on_a_gaussian_from_a_non_stationary_cloud(temperature):
    """g = ∇H = TΣ⁻¹θ: T·gm(C_θ, C_g) = Σ for any cloud of n > d points; the draws alone are far off."""
    d, n = 5, 40
    cov = random_cov(d, seed=7)
    cloud = 3.0 * torch.randn(n, d, generator=torch.Generator().manual_seed(8), dtype=DTYPE) * torch.arange(
        1, d + 1, dtype=DTYPE)  # overdispersed and axis-aligned: C_θ is nothing like Σ
    grads = temperature * cloud @ torch.linalg.inv(cov)
    mass = LearnedMass("dense", burn_in=n, windows=1, jitter=0.0, gradients=True, temperature=temperature)
    torch.testing.assert_close(mass.covariance(feed_pairs(mass, cloud, grads)), cov, rtol=1e-9, atol=1e-9)
    draws_only = LearnedMass("dense", burn_in=n, windows=1, jitter=0.0)
    assert (draws_only.covariance(feed(draws_only, cloud)) - cov).norm() > 0.5 * cov.norm()
    wrong = LearnedMass("dense", burn_in=n, windows=1, jitter=0.0, gradients=True, temperature=2 * temperature)
    assert not torch.allclose(wrong.covariance(feed_pairs(wrong, cloud, grads)), cov, rtol=1e-3)


def test_gradient_informed_diagonal_estimate_is_exact_on_an_axis_aligned_gaussian():
    n, variances = 30, torch.tensor([0.1, 1.0, 25.0], dtype=DTYPE)
    cloud = torch.randn(n, 3, generator=torch.Generator().manual_seed(9), dtype=DTYPE)  # unit spread: wrong
    mass = LearnedMass("diag", burn_in=n, windows=1, jitter=0.0, gradients=True, temperature=0.5)
    estimate = mass.covariance(feed_pairs(mass, cloud, 0.5 * cloud / variances))[0]
    torch.testing.assert_close(estimate, variances, rtol=1e-10, atol=1e-12)


def test_pooled_gradient_informed_estimate_through_baoab_at_posterior_temperature():
    """Driven by the engine (BAOAB, 4 pooled chains, T = 1/N, num_data conventions both ways): one
    100-step window from an overdispersed start gives Σ within 1 %, the draws' covariance is > 30 % off."""
    from bayesflow.ensemble import lift

    cov = random_cov(5, seed=1)
    precision = torch.linalg.inv(cov)
    temperature = 1e-2
    for num_data in (1.0, 100.0):
        scale = temperature * num_data  # law ∝ exp(ℓ/(N T)) = N(0, Σ)

        def log_posterior(p, batch, scale=scale):
            return -0.5 * scale * ((p @ precision) * p).sum(-1), None

        errors = []
        for gradients in (True, False):
            mass = LearnedMass("dense", burn_in=100, windows=1, chains=4, pool=True, gradients=gradients)
            transform = lift(baoab.build(log_posterior, lr=2.5, alpha=0.1, temperature=temperature, mass=mass,
                                         num_data=num_data), 4, vectorize="batched")
            start = 5 * torch.randn(4, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
            state = transform.init(start, seed=0)
            for _ in range(101):
                state, _ = transform.update(state, None, inplace=True)
            errors.append(float((mass.covariance(state.preconditioner[0])[0] - cov).norm() / cov.norm()))
        assert errors[0] < 0.01 and errors[1] > 0.3, (num_data, errors)


def test_gradient_informed_mass_needs_a_constant_positive_temperature():
    with pytest.raises(TypeError, match="gradients must be True or False"):
        LearnedMass("dense", gradients="yes")
    with pytest.raises(ValueError, match="constant positive finite temperature"):
        LearnedMass("dense", gradients=True, temperature=0.0)
    with pytest.raises(ValueError, match="constant positive finite temperature"):
        baoab.config(lr=0.1, temperature=lambda step: 1.0, mass=LearnedMass("dense", gradients=True))
    mass = LearnedMass("diag", burn_in=20, gradients=True)
    config = SDEConfig(step_size=0.1, diffusion=Block({("momenta", "momenta"): Scalar(1.0)}), curl=mass.curl(),
                       integrator=Splitting("BAOAB"))
    with pytest.raises(ValueError, match="give temperature=T"):
        build(lambda p, batch: (-0.5 * (p**2).sum(), None), config).init(torch.zeros(2))
    bound = mass.at_temperature(0.25)
    assert bound.temperature == 0.25 and mass.temperature is None and "temperature=0.25" in repr(bound)
    assert LearnedMass("diag").at_temperature(0.25).temperature is None  # draws only: nothing to bind


@pytest.mark.parametrize("compile_mode", [False, "replay"])
def test_a_refused_in_place_step_leaves_the_learned_mass_statistics_as_they_were(compile_mode):
    """BAOAB evaluates ∇ℓ after moving, once the learned mass has taken in this step's θ: a refused
    in-place step puts back the statistics too, not only θ and m."""
    import bayesflow
    from bayesflow.engine import LearnedMass
    from bayesflow.sgmcmc import baoab

    def log_posterior(params, batch):
        return -0.5 * (params**2).sum() * (math.nan if batch else 1.0), None

    transform = baoab.build(log_posterior, lr=0.5, burn_in_lr=0.05, alpha=1.0, temperature=1.0,
                            mass=LearnedMass("dense", burn_in=14), on_nonfinite="reject", compile=compile_mode)
    state = transform.init(torch.zeros(2), seed=0)
    for _ in range(3):
        state, _ = transform.update(state, False, inplace=True)
    before = {k: v.clone() for k, v in bayesflow.state_dict(state).items()}
    state, _ = transform.update(state, True, inplace=True)
    after = bayesflow.state_dict(state)
    assert int(state.rejected) == 1
    for key, value in before.items():
        if key not in ("step", "rejected"):
            torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
