"""The sampler against closed forms.

Gaussian data x0 ~ N(mu, diag(s^2)) has the exact denoiser
D(x; sigma) = mu + s^2/(s^2+sigma^2) (x - mu) and the probability-flow ODE
dx/dsigma = (x - D)/sigma has the exact solution
x(sigma_b) = mu + (x(sigma_a) - mu) sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2)).
"""
import math

import numpy as np
import torch

from conftest import text_batch, tiny_dit
from model import denoise, null_condition
from sampler import (cfg, cfgpp, karras_sigmas, noise_from_seeds, sample, sample_dpmpp_2m, solve,
                     text_estimate)

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
    x_T = torch.randn(256, 4, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0)) * 80.0
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
    # Euler on dx/dsigma = (x - D)/sigma from sigma_a to sigma_b:
    # x + (sigma_b - sigma_a)(x - D)/sigma_a
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
    out = sample(model, noise, text, mask, steps=8, cfg_scale=3.0, cfgpp_lambda=0.0,
                 cfgpp_range=(0.0, 1.0))
    sigmas = karras_sigmas(8, 0.002, 80.0)
    with torch.no_grad():
        ref = sample_dpmpp_2m(lambda x, s: denoise(model, x, s, text, null_condition(mask)),
                              noise * 80.0, sigmas)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_cfg_with_scale_one_is_the_conditional_sampler():
    model = tiny_dit()
    text, mask = text_batch(3)
    noise = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    out = sample(model, noise, text, mask, steps=8, cfg_scale=1.0, cfgpp_lambda=0.7,
                 cfgpp_range=(0.0, 0.0))
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
            estimate = text_estimate(model, text, mask)
            out_pp = solve(estimate, x, sigmas, lambda i, D_c, D_u: cfgpp(D_c, D_u, lam), order=1)
            out_cfg = solve(estimate, x, sigmas, lambda i, D_c, D_u: cfg(D_c, D_u, omega), order=1)
        torch.testing.assert_close(out_pp, out_cfg, rtol=1e-4, atol=1e-4)


def test_one_batched_forward_of_2B_per_step():
    model = tiny_dit()
    batch_sizes = []
    model.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    text, mask = text_batch(3)
    sample(model, torch.randn(3, 4, 8), text, mask, steps=5, cfg_scale=2.0, cfgpp_lambda=0.5,
           cfgpp_range=(0.4, 1.0))
    assert batch_sizes == [6] * 5


def test_cfgpp_range_selects_steps_by_position():
    from sampler import uses_cfgpp
    assert ([uses_cfgpp(i, 10, (0.2, 0.6)) for i in range(10)]
            == [False] * 2 + [True] * 4 + [False] * 4)
    assert ([uses_cfgpp(i, 20, (0.2, 0.6)) for i in range(20)]
            == [False] * 4 + [True] * 8 + [False] * 8)


def test_sampling_is_deterministic_and_noise_is_per_seed():
    model = tiny_dit()
    text, mask = text_batch(3)
    noise = noise_from_seeds([5, 6, 7], (4, 8))
    kw = dict(steps=6, cfg_scale=2.0, cfgpp_lambda=0.5, cfgpp_range=(0.0, 0.5))
    torch.testing.assert_close(sample(model, noise, text, mask, **kw),
                               sample(model, noise.clone(), text, mask, **kw), rtol=0, atol=0)
    torch.testing.assert_close(noise_from_seeds([7], (4, 8))[0], noise[2], rtol=0, atol=0)
    assert not torch.equal(noise[0], noise[1])


def test_sampler_keeps_no_graph():
    model = tiny_dit()
    text, mask = text_batch(2)
    out = sample(model, torch.randn(2, 4, 8), text, mask, steps=3, cfg_scale=2.0)
    assert not out.requires_grad and math.isfinite(out.abs().sum().item())


# ---------------------------------------------------------------------------------------------
# CFG / CFG++ on a two-Gaussian world with an exact denoiser, against transcriptions of the
# published updates (k-diffusion's sample_dpmpp_2m for CFG steps, the CFG++ authors' DPM++ 2M
# CFG++ step for CFG++ steps), through sampler.sample.
# Data: class k in {0, 1} with probability 1/2, x0 ~ N(m_k 1, s^2 I). The prompt names the class;
# the conditional denoiser is the class's Gaussian one, the unconditional one the mixture's.
# ---------------------------------------------------------------------------------------------

M, S2 = torch.tensor([-0.6, 0.5], dtype=torch.float64), 0.3 ** 2


def gaussian_class_D(x, sigma, k):
    m = M[k].reshape(-1, *[1] * (x.dim() - 1))
    return m + S2 / (S2 + sigma ** 2) * (x - m)


def mixture_D(x, sigma):
    # scalar or [B] sigma
    var = S2 + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1) ** 2
    logp = torch.stack([-(x - M[k]).pow(2).flatten(1).sum(1) / (2 * var) for k in (0, 1)], dim=1)
    w = logp.softmax(dim=1)
    w0, w1 = (w[:, k].reshape(-1, *[1] * (x.dim() - 1)) for k in (0, 1))
    zeros, ones = torch.zeros(len(x), dtype=torch.long), torch.ones(len(x), dtype=torch.long)
    return w0 * gaussian_class_D(x, sigma, zeros) + w1 * gaussian_class_D(x, sigma, ones)


class TwoGaussianModel(torch.nn.Module):
    """F(c_in x; c_noise, text, mask) of the exact denoiser, so that model.denoise gives D exactly:
    the class is read from text[:, 0, 0] > 0; an all-masked prompt is the null condition."""
    config = type("Config", (), {"sigma_data": 0.5})

    def forward(self, x_in, c_noise, text, mask):
        x_in = x_in.double()
        sigma = (4 * c_noise.double()).exp().reshape(-1, 1, 1)
        x = x_in * (sigma ** 2 + 0.25).sqrt()                                 # undo c_in
        k = (text[:, 0, 0] > 0).long()
        D = torch.where(mask.any(1).reshape(-1, 1, 1), gaussian_class_D(x, sigma, k),
                        mixture_D(x, sigma))
        c_skip, c_out = 0.25 / (sigma ** 2 + 0.25), sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
        return ((D - c_skip * x) / c_out).float()


def published_sampler(x, classes, sigmas, w, lam, cfgpp_steps, correction):
    """Transcription: k-diffusion's DPM-Solver++(2M) on D_w for CFG steps, and the CFG++ authors'
    DPM++ 2M CFG++ step (buffer: the unconditional estimate) for CFG++ steps; 'old_denoised' is the
    previous step's estimate in the current step's mode (D_w,i-1 for CFG, D_u,i-1 for CFG++)."""
    t_fn = lambda s: -math.log(s)                                            # noqa: E731
    prev = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        D_c, D_u = gaussian_class_D(x, s, classes), mixture_D(x, s)
        if i in cfgpp_steps:
            denoised, uncond_denoised = D_u + lam * (D_c - D_u), D_u
            old_denoised = None if prev is None else prev[1]
            if old_denoised is None or s_next == 0:
                # to_d(x, sigma, D_u) * sigma_next
                x = denoised + (x - uncond_denoised) / s * s_next
            else:
                h = t_fn(s_next) - t_fn(s)
                r = (t_fn(s) - t_fn(float(sigmas[i - 1]))) / h
                newer = uncond_denoised if correction == "uncond" else denoised
                extra1 = (-math.exp(-h) * uncond_denoised
                          - math.expm1(-h) * (newer - old_denoised) / (2 * r))
                x = denoised + extra1 + math.exp(-h) * x
        else:
            denoised = D_u + w * (D_c - D_u)
            old_denoised = None if prev is None else prev[1] + w * (prev[0] - prev[1])
            if s_next == 0:
                x = denoised
            else:
                h = t_fn(s_next) - t_fn(s)
                if old_denoised is None:
                    x = (s_next / s) * x - math.expm1(-h) * denoised
                else:
                    r = (t_fn(s) - t_fn(float(sigmas[i - 1]))) / h
                    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                    x = (s_next / s) * x - math.expm1(-h) * denoised_d
        prev = (D_c, D_u)
    return x


def two_gaussian_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    classes = torch.arange(n) % 2
    text = torch.where(classes.bool(), 1.0, -1.0).reshape(n, 1, 1).expand(n, 2, 3).contiguous()
    return torch.randn(n, 2, 4, generator=g), text, torch.ones(n, 2, dtype=torch.bool), classes


def test_mode_switch_and_both_cfgpp_corrections_match_the_published_updates():
    noise, text, mask, classes = two_gaussian_batch()
    for steps in (12, 40):
        sigmas = karras_sigmas(steps, 0.002, 80.0)
        for cfgpp_range in ((0.0, 0.5), (0.5, 1.0), (0.25, 0.75), (0.0, 1.0), (0.0, 0.0)):
            for correction in ("uncond", "guided"):
                kw = dict(steps=steps, cfg_scale=3.0, cfgpp_lambda=0.5, cfgpp_range=cfgpp_range,
                          cfgpp_correction=correction)
                ours = sample(TwoGaussianModel(), noise, text, mask, **kw).double()
                pp_steps = [i for i in range(steps) if cfgpp_range[0] <= i / steps < cfgpp_range[1]]
                ref = published_sampler(noise.double() * 80.0, classes, sigmas, 3.0, 0.5, pp_steps,
                                        correction)
                torch.testing.assert_close(ours, ref, rtol=0, atol=2e-4 * ref.abs().max().item(),
                                           msg=f"{steps} steps, CFG++ on {cfgpp_range}, "
                                               f"{correction}")


def test_the_two_cfgpp_corrections_differ_and_agree_without_guidance():
    noise, text, mask, _ = two_gaussian_batch()
    kw = dict(steps=12, cfg_scale=3.0, cfgpp_range=(0.0, 1.0))
    run = {c: sample(TwoGaussianModel(), noise, text, mask, cfgpp_lambda=0.5,
                     cfgpp_correction=c, **kw)
           for c in ("uncond", "guided")}
    assert (run["uncond"] - run["guided"]).abs().max() > 0.05       # the guided form adds guidance
    # at lambda = 0 both are the unguided DPM-Solver++(2M) on the mixture's exact denoiser
    sigmas = karras_sigmas(12, 0.002, 80.0)
    unguided = sample_dpmpp_2m(mixture_D, noise.double() * 80.0, sigmas)
    for c in ("uncond", "guided"):
        out = sample(TwoGaussianModel(), noise, text, mask, cfgpp_lambda=0.0,
                     cfgpp_correction=c, **kw)
        torch.testing.assert_close(out.double(), unguided, rtol=0, atol=1e-4)


def test_switching_from_cfgpp_to_cfg_gives_no_guidance_kick():
    """A schedule whose CFG++ and CFG steps apply the same guidance must not jump at the switch.
    With w_i = lambda sigma_i / (sigma_i - sigma_{i+1}) a CFG++ Euler step is a CFG Euler step
    (Chung et al. 2024); first order, so both runs are the same sampler up to rounding."""
    noise, text, mask, _ = two_gaussian_batch()
    steps, lam = 12, 0.5
    sigmas = karras_sigmas(steps, 0.002, 80.0)
    omega = [lam * float(sigmas[i]) / float(sigmas[i] - sigmas[i + 1]) for i in range(steps)]
    estimate = text_estimate(TwoGaussianModel(), text, mask)
    x = noise * 80.0
    pp_then_cfg = solve(estimate, x, sigmas, lambda i, D_c, D_u: cfgpp(D_c, D_u, lam) if i < 6 else
                        cfg(D_c, D_u, omega[i]), order=1)
    all_cfg = solve(estimate, x, sigmas, lambda i, D_c, D_u: cfg(D_c, D_u, omega[i]), order=1)
    torch.testing.assert_close(pp_then_cfg, all_cfg, rtol=0, atol=1e-4)


def test_cfg_rescale_matches_the_conditional_estimates_mean_and_std():
    g = torch.Generator().manual_seed(3)
    D_c, D_u = torch.randn(5, 4, 8, generator=g) + 0.4, torch.randn(5, 4, 8, generator=g) * 0.3
    D, D_bar = cfg(D_c, D_u, 3.0, rescale=1.0)
    assert D_bar is D
    for b in range(5):                                   # direct definitions, example by example
        torch.testing.assert_close(D[b].mean(), D_c[b].mean())
        torch.testing.assert_close(D[b].std(), D_c[b].std())
        D_w = D_u[b] + 3.0 * (D_c[b] - D_u[b])
        torch.testing.assert_close((D[b] - D[b].mean()) / D[b].std(),
                                   (D_w - D_w.mean()) / D_w.std())
    torch.testing.assert_close(cfg(D_c, D_u, 3.0, rescale=0.0)[0], D_u + 3.0 * (D_c - D_u))
    half = cfg(D_c, D_u, 3.0, rescale=0.5)[0]
    torch.testing.assert_close(half, 0.5 * D + 0.5 * (D_u + 3.0 * (D_c - D_u)))
    # w = 1: nothing to rescale
    torch.testing.assert_close(cfg(D_c, D_u, 1.0, rescale=1.0)[0], D_c)


def test_bf16_autocast_path_runs_on_the_cpu_and_stays_close_to_float32():
    """generate_latents(bf16=True) samples under bf16 autocast (the CUDA default), here on the CPU:
    it must differ from float32 (autocast was really on) but only by bf16 rounding."""
    from sampler import generate_latents

    class Encoder:
        def __call__(self, prompts):
            return text_batch(len(prompts))
    model = tiny_dit()
    kw = dict(steps=6, cfg_scale=2.0, cfgpp_lambda=0.5, cfgpp_range=(0.5, 1.0))
    fp32 = generate_latents(model, ["a"] * 3, [1, 2, 3], 8, Encoder(), kw, torch.device("cpu"))
    bf16 = generate_latents(model, ["a"] * 3, [1, 2, 3], 8, Encoder(), kw, torch.device("cpu"),
                            bf16=True)
    assert fp32.dtype == bf16.dtype == torch.float32
    err = (bf16 - fp32).abs().max().item()
    assert 0 < err < 0.05 * fp32.abs().max().item()
