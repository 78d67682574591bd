"""The sampler against closed forms.

Gaussian data x0 ~ N(mu, diag(s^2)) has the exact denoiser D(x; sigma) = mu + s^2/(s^2+sigma^2) (x - mu)
and the probability-flow ODE dx/dsigma = (x - D)/sigma has the exact solution
x(sigma_b) = mu + (x(sigma_a) - mu) sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2)).
"""
import math

import numpy as np
import torch

from conftest import text_batch, tiny_dit
from model import denoise, null_condition
from sampler import guided_estimate, karras_sigmas, noise_from_seeds, sample, sample_dpmpp_2m, solve

MU = torch.tensor([0.3, -1.0, 2.0, 0.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 2.0, 0.1], dtype=torch.float64)


def gaussian_D(x, sigma):
    return MU + S ** 2 / (S ** 2 + sigma ** 2) * (x - MU)


def gaussian_ode(x, sigma_a, sigma_b):
    return MU + (x - MU) * torch.sqrt((S ** 2 + sigma_b ** 2) / (S ** 2 + sigma_a ** 2))


def test_karras_sigmas_endpoints_and_rho_spacing():
    sigmas = karras_sigmas(10, 0.002, 80.0, 7.0)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (11,)
    assert sigmas[0].item() == 80.0 and sigmas[-1].item() == 0.0
    assert abs(sigmas[-2].item() - 0.002) < 1e-15
    assert (sigmas[1:] < sigmas[:-1]).all()
    # sigma^(1/rho) is evenly spaced by definition
    steps = torch.diff(sigmas[:-1] ** (1 / 7.0))
    torch.testing.assert_close(steps, torch.full_like(steps, steps[0].item()))


def convergence_order(order, Ns=(10, 20, 40, 80, 160)):
    x_T = torch.randn(256, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    exact = gaussian_ode(x_T, 80.0, 0.002)
    errors = []
    for N in Ns:
        sigmas = karras_sigmas(N, 0.002, 80.0)[:-1]     # compare at sigma_min, before the jump to 0
        x = sample_dpmpp_2m(gaussian_D, x_T.clone(), sigmas, order=order)
        errors.append((x - exact).abs().max().item())
    slope = -np.polyfit(np.log(Ns), np.log(errors), 1)[0]
    return slope, errors


def test_dpmpp_2m_is_second_order_on_gaussian_data():
    slope, errors = convergence_order(order=2)
    assert 1.85 < slope < 2.4, (slope, errors)
    assert errors[-1] < 5e-3


def test_first_order_path_is_first_order_on_gaussian_data():
    slope, errors = convergence_order(order=1)
    assert 0.9 < slope < 1.15, (slope, errors)


def test_first_order_step_is_the_euler_step_in_sigma():
    # Euler on dx/dsigma = (x - D)/sigma from sigma_a to sigma_b: x + (sigma_b - sigma_a)(x - D)/sigma_a
    x = torch.randn(8, 4, dtype=torch.float64)
    out = sample_dpmpp_2m(gaussian_D, x, torch.tensor([2.0, 1.3], dtype=torch.float64), order=1)
    torch.testing.assert_close(out, x + (1.3 - 2.0) * (x - gaussian_D(x, 2.0)) / 2.0)


def test_last_step_to_zero_returns_the_denoised_estimate():
    x = torch.randn(8, 4, dtype=torch.float64)
    sigmas = karras_sigmas(160, 0.002, 80.0)
    before = sample_dpmpp_2m(gaussian_D, x * 80.0, sigmas[:-1])
    after = sample_dpmpp_2m(gaussian_D, x * 80.0, sigmas)
    torch.testing.assert_close(after, gaussian_D(before, 0.002))
    torch.testing.assert_close(after, gaussian_ode(x * 80.0, 80.0, 0.0), atol=5e-3, rtol=0)


def test_cfgpp_with_lambda_zero_is_the_unguided_sampler():
    model = tiny_dit()
    text, mask = text_batch(3)
    noise = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    out = sample(model, noise, text, mask, steps=8, cfg_scale=3.0, cfgpp_lambda=0.0, cfgpp_range=(0.0, 1.0))
    sigmas = karras_sigmas(8, 0.002, 80.0)
    with torch.no_grad():
        ref = sample_dpmpp_2m(lambda x, s: denoise(model, x, s, text, null_condition(mask)), noise * 80.0, sigmas)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cfg_with_scale_one_is_the_conditional_sampler():
    model = tiny_dit()
    text, mask = text_batch(3)
    noise = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    out = sample(model, noise, text, mask, steps=8, cfg_scale=1.0, cfgpp_lambda=0.7, cfgpp_range=(0.0, 0.0))
    sigmas = karras_sigmas(8, 0.002, 80.0)
    with torch.no_grad():
        ref = sample_dpmpp_2m(lambda x, s: denoise(model, x, s, text, mask), noise * 80.0, sigmas)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    unguided = sample(model, noise, text, mask, steps=8, cfg_scale=0.0)
    assert (out - unguided).abs().max() > 1e-3           # the text does matter to this model


def test_cfgpp_euler_step_equals_cfg_euler_step_with_rescaled_weight():
    model = tiny_dit()
    text, mask = text_batch(4)
    x = torch.randn(4, 4, 8)
    lam = 0.6
    for sigma_i, sigma_next in ((5.0, 3.0), (1.0, 0.4), (0.3, 0.29)):
        sigmas = torch.tensor([sigma_i, sigma_next], dtype=torch.float64)
        omega = lam * sigma_i / (sigma_i - sigma_next)
        with torch.no_grad():
            cfgpp = solve(guided_estimate(model, text, mask, 1, 1.0, lam, (0.0, 1.0)), x, sigmas, order=1)
            cfg = solve(guided_estimate(model, text, mask, 1, omega, 0.0, (0.0, 0.0)), x, sigmas, order=1)
        torch.testing.assert_close(cfgpp, cfg, rtol=1e-4, atol=1e-4)


def test_one_batched_forward_of_2B_per_step():
    model = tiny_dit()
    batch_sizes = []
    model.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    text, mask = text_batch(3)
    sample(model, torch.randn(3, 4, 8), text, mask, steps=5, cfg_scale=2.0, cfgpp_lambda=0.5, cfgpp_range=(0.4, 1.0))
    assert batch_sizes == [6] * 5


def test_cfgpp_range_selects_steps_by_position():
    from sampler import uses_cfgpp
    assert [uses_cfgpp(i, 10, (0.2, 0.6)) for i in range(10)] == [False] * 2 + [True] * 4 + [False] * 4
    assert [uses_cfgpp(i, 20, (0.2, 0.6)) for i in range(20)] == [False] * 4 + [True] * 8 + [False] * 8


def test_sampling_is_deterministic_and_noise_is_per_seed():
    model = tiny_dit()
    text, mask = text_batch(3)
    noise = noise_from_seeds([5, 6, 7], (4, 8))
    kw = dict(steps=6, cfg_scale=2.0, cfgpp_lambda=0.5, cfgpp_range=(0.0, 0.5))
    torch.testing.assert_close(sample(model, noise, text, mask, **kw), sample(model, noise.clone(), text, mask, **kw),
                               rtol=0, atol=0)
    torch.testing.assert_close(noise_from_seeds([7], (4, 8))[0], noise[2], rtol=0, atol=0)
    assert not torch.equal(noise[0], noise[1])


def test_sampler_keeps_no_graph():
    model = tiny_dit()
    text, mask = text_batch(2)
    out = sample(model, torch.randn(2, 4, 8), text, mask, steps=3, cfg_scale=2.0)
    assert not out.requires_grad and math.isfinite(out.abs().sum().item())
