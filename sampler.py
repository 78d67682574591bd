"""The paper's inference sampler: Karras sigmas, DPM-Solver++(2M), CFG and CFG++.

Read next to PAPER.md, section "Samplers". Everything is written for a denoiser D(x; sigma) in
the EDM convention x = x0 + sigma n (the k-diffusion convention), so any model can be sampled
through `sample_dpmpp_2m(denoise, x, sigmas)`. Sigma arithmetic is float64 (Python floats);
the model may run in bf16 under autocast on a GPU while x stays float32.

One update serves every case. Each step i gives two estimates of the clean signal:
  D_hat  the estimate the step denoises with        (CFG: D_w,      CFG++: D_lambda)
  D_bar  the estimate the step re-noises along       (CFG: D_w,      CFG++: D_u)
and with t = -ln sigma, h_i = t_{i+1} - t_i, r = h_{i-1} / h_i the DPM-Solver++(2M) step is
  x <- D_hat_i + e^{-h_i} (x - D_bar_i) + (1 - e^{-h_i}) (D_hat_i - D_bar_{i-1}) / (2r)
(the last term is left out at the first step and at the step to sigma = 0: lower-order steps).
With D_hat = D_bar = D this is exactly PAPER.md's  x <- (sigma_{i+1}/sigma_i) x + (1 - e^{-h}) D~,
D~ = (1 + 1/(2r)) D_i - (1/(2r)) D_{i-1};  with D_hat = D_lambda, D_bar = D_u it is PAPER.md's
CFG++ 2M step, whose history buffer holds the unconditional estimate.
"""
import math

import torch
from tqdm import tqdm

from model import denoise as model_denoise
from model import null_condition


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..n-1, then sigma_n = 0. Returns n+1 float64 values (PAPER.md "Samplers")."""
    if n < 1:
        raise ValueError(f"number of sampler steps must be >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def solve(estimate, x, sigmas, order=2, progress=False):
    """Integrate the probability-flow ODE from sigmas[0] down to sigmas[-1].

    estimate(x, sigma, i) -> (D_hat, D_bar). order=2: DPM-Solver++(2M); order=1: its first-order
    form, x <- D + (sigma_{i+1}/sigma_i)(x - D), which is also the Euler step of the ODE in sigma.
    """
    if order not in (1, 2):
        raise ValueError(f"sampler order must be 1 or 2, got {order}")
    sigmas = [float(s) for s in sigmas]
    D_bar_prev = None
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling", leave=False):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        D_hat, D_bar = estimate(x, sigma, i)
        if sigma_next == 0:                   # last step: h = inf, e^{-h} = 0, first order
            x = D_hat
        else:
            h = math.log(sigma) - math.log(sigma_next)        # h_i = t_{i+1} - t_i, t = -ln sigma
            x = D_hat + math.exp(-h) * (x - D_bar)
            if order == 2 and D_bar_prev is not None:         # second-order correction
                r = (math.log(sigmas[i - 1]) - math.log(sigma)) / h   # r = h_{i-1} / h_i
                x = x - math.expm1(-h) / (2 * r) * (D_hat - D_bar_prev)
        D_bar_prev = D_bar
    return x


def sample_dpmpp_2m(denoise, x, sigmas, order=2, progress=False):
    """Unguided DPM-Solver++(2M): x at sigmas[0] -> x at sigmas[-1]. denoise(x, sigma) -> D(x; sigma)
    for a batch and a scalar sigma (the k-diffusion convention)."""
    def estimate(x, sigma, i):
        D = denoise(x, sigma)
        return D, D
    return solve(estimate, x, sigmas, order, progress)


def uses_cfgpp(i, steps, cfgpp_range):
    """Step i of `steps` uses CFG++ when its position i/steps lies in [start, stop) of the range.
    A range in fractions of the schedule keeps the same noise levels guided at any step count."""
    start, stop = cfgpp_range
    return start <= i / steps < stop


def guided_estimate(model, text, mask, steps, cfg_scale, cfgpp_lambda, cfgpp_range, autocast_dtype=None):
    """estimate(x, sigma, i) for a text-conditioned model with CFG / CFG++ (PAPER.md "Samplers").

    One batched forward of 2B examples per step: the prompts, then the same prompts under the
    null condition (every text key masked, model.null_condition).
      CFG:   D_w = D_u + w (D_c - D_u);            denoise and re-noise with D_w
      CFG++: D_lambda = D_u + lambda (D_c - D_u); denoise with D_lambda, re-noise along D_u
    """
    text2 = torch.cat([text, text])
    mask2 = torch.cat([mask, null_condition(mask)])

    def estimate(x, sigma, i):
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            D = model_denoise(model, torch.cat([x, x]), sigma, text2, mask2)
        D_c, D_u = D.to(x.dtype).chunk(2)
        if uses_cfgpp(i, steps, cfgpp_range):
            return D_u + cfgpp_lambda * (D_c - D_u), D_u
        D_w = D_u + cfg_scale * (D_c - D_u)
        return D_w, D_w
    return estimate


def noise_from_seeds(seeds, shape, device="cpu"):
    """Initial noise [len(seeds), *shape], example k drawn from its own seed: the same seed gives
    the same noise whatever the batch it sits in (same-noise win rates, DDP sharding)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


@torch.no_grad()
def sample(model, noise, text, mask, steps=40, sigma_min=0.002, sigma_max=80.0, rho=7.0, cfg_scale=1.0,
           cfgpp_lambda=0.0, cfgpp_range=(0.0, 0.0), order=2, autocast_dtype=None, progress=False):
    """Generate latents [B, C, T] from unit-variance noise [B, C, T] and prompts (text, mask).

    Deterministic: the same noise and prompts give the same output. No activations are kept.
    The keyword arguments are the `sampler` section of config.yaml.
    """
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    estimate = guided_estimate(model, text, mask, steps, cfg_scale, cfgpp_lambda, cfgpp_range, autocast_dtype)
    return solve(estimate, noise.float() * sigmas[0].item(), sigmas, order, progress)
