"""The paper's inference sampler: Karras sigmas, DPM-Solver++(2M), CFG and CFG++.

Everything is written for a denoiser D(x; sigma) in the EDM convention x = x0 + sigma n (the
k-diffusion convention), so any model can be sampled through `sample_dpmpp_2m(denoise, x, sigmas)`.
Sigma arithmetic is float64 (Python floats); the model may run in bf16 under autocast while x
stays float32.

Each step i evaluates the conditional and the unconditional denoiser, D_c and D_u, and its
guidance mode turns them into two estimates of the clean signal:
  D_hat  the estimate the step denoises with   (CFG: D_w = D_u + w (D_c - D_u),  CFG++: D_lambda)
  D_bar  the estimate the step re-noises along  (CFG: D_w,                       CFG++: D_u)
With t = -ln sigma, h_i = t_{i+1} - t_i, r = h_{i-1} / h_i the DPM-Solver++(2M) step is
  x <- D_hat_i + e^{-h_i} (x - D_bar_i) + (1 - e^{-h_i}) (E_i - D_bar_{i-1}) / (2r)
where D_bar_{i-1} is the previous step's D_c, D_u combined in *this* step's mode (so a switch
between CFG and CFG++ never mixes the two modes in one difference), and E_i is
  'uncond' (default): D_bar_i   the finite difference of the one estimate the step re-noises along
  'guided':           D_hat_i   CFG++'s form with the guided estimate in the difference
(the two are the same for CFG, where D_hat = D_bar). The last term is left out at the first step
and at the step to sigma = 0 (lower-order steps). With D_hat = D_bar = D this is exactly
DPM-Solver++(2M): x <- (sigma_{i+1}/sigma_i) x + (1 - e^{-h}) ((1 + 1/(2r)) D_i - D_{i-1}/(2r)).
"""
import math

import torch
from tqdm import tqdm

from launch import gather, rank_shard
from model import denoise as model_denoise
from model import null_condition

CORRECTIONS = ("uncond", "guided")


def karras_sigmas(n, sigma_min, sigma_max, rho=7.0):
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    i = 0..n-1, then sigma_n = 0. Returns n+1 float64 values (Karras et al. 2022, Eq. 5)."""
    if n < 1:
        raise ValueError(f"number of sampler steps must be >= 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1).double()
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


# ---------------------------------------------------------------------------------------------
# Guidance modes: (D_c, D_u) -> (D_hat, D_bar)
# ---------------------------------------------------------------------------------------------

def cfg(D_c, D_u, w, rescale=0.0):
    """Classifier-free guidance: D_w = D_u + w (D_c - D_u); denoise and re-noise with D_w.

    rescale = phi in [0, 1] (guidance rescale, Lin et al. 2024, Sec. 3.4, in its mean-and-std form
    for latents that are not zero-mean): extrapolating with w > 1 exaggerates the estimate's
    contrast, which in log-mel latents means louder peaks (RESULTS.md: the sampler table), so D_w
    is standardised to D_c's mean and standard deviation per example, then mixed back:
    D = phi (m_c + (D_w - m_w) s_c / s_w) + (1 - phi) D_w."""
    D_w = D_u + w * (D_c - D_u)
    if rescale:
        dims = tuple(range(1, D_w.dim()))
        m_c, s_c = D_c.mean(dims, keepdim=True), D_c.std(dims, keepdim=True)
        m_w, s_w = D_w.mean(dims, keepdim=True), D_w.std(dims, keepdim=True)
        D_w = rescale * (m_c + (D_w - m_w) * s_c / s_w.clamp(min=1e-12)) + (1 - rescale) * D_w
    return D_w, D_w


def cfgpp(D_c, D_u, lam):
    """CFG++ (Chung et al. 2024): denoise with D_lambda = D_u + lambda (D_c - D_u), lambda in
    [0, 1], but re-noise along the unconditional D_u."""
    return D_u + lam * (D_c - D_u), D_u


def uses_cfgpp(i, steps, cfgpp_range):
    """Step i of `steps` uses CFG++ when its position i/steps lies in [start, stop) of the range.
    A range in fractions of the schedule keeps the same noise levels guided at any step count."""
    start, stop = cfgpp_range
    return start <= i / steps < stop


def guidance_schedule(steps, cfg_scale, cfgpp_lambda, cfgpp_range, cfg_rescale=0.0):
    """mode(i, D_c, D_u) -> (D_hat, D_bar): CFG++ on the steps in cfgpp_range, CFG on the rest."""
    def mode(i, D_c, D_u):
        if uses_cfgpp(i, steps, cfgpp_range):
            return cfgpp(D_c, D_u, cfgpp_lambda)
        return cfg(D_c, D_u, cfg_scale, cfg_rescale)
    return mode


# ---------------------------------------------------------------------------------------------
# The solver
# ---------------------------------------------------------------------------------------------

def solve(estimate, x, sigmas, mode, order=2, correction="uncond", progress=False):
    """Integrate the probability-flow ODE from sigmas[0] down to sigmas[-1].

    estimate(x, sigma) -> (D_c, D_u); mode(i, D_c, D_u) -> (D_hat, D_bar) of step i.
    order=2: DPM-Solver++(2M); order=1: its first-order form
    x <- D_hat + (sigma_{i+1}/sigma_i)(x - D_bar), for CFG the Euler step in sigma (DDIM)."""
    if order not in (1, 2):
        raise ValueError(f"sampler order must be 1 or 2, got {order}")
    if correction not in CORRECTIONS:
        raise ValueError(f"sampler.cfgpp_correction must be one of {CORRECTIONS}, got "
                         f"{correction!r}")
    sigmas = [float(s) for s in sigmas]
    previous = None                                           # (D_c, D_u) of step i - 1
    for i in tqdm(range(len(sigmas) - 1), disable=not progress, desc="sampling", leave=False):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        D_c, D_u = estimate(x, sigma)
        D_hat, D_bar = mode(i, D_c, D_u)
        # last step: h = inf, e^{-h} = 0, first order
        if sigma_next == 0:
            x = D_hat
        else:
            h = math.log(sigma) - math.log(sigma_next)        # h_i = t_{i+1} - t_i, t = -ln sigma
            x = D_hat + math.exp(-h) * (x - D_bar)
            if order == 2 and previous is not None:          # second-order correction
                r = (math.log(sigmas[i - 1]) - math.log(sigma)) / h   # r = h_{i-1} / h_i
                D_bar_prev = mode(i, *previous)[1]            # step i-1's estimate in step i's mode
                E = D_bar if correction == "uncond" else D_hat
                x = x - math.expm1(-h) / (2 * r) * (E - D_bar_prev)
        previous = (D_c, D_u)
    return x


def sample_dpmpp_2m(denoise, x, sigmas, order=2, progress=False):
    """Unguided DPM-Solver++(2M): x at sigmas[0] -> x at sigmas[-1]. denoise(x, sigma) ->
    D(x; sigma) for a batch and a scalar sigma (the k-diffusion convention)."""
    def estimate(x, sigma):
        D = denoise(x, sigma)
        return D, D
    return solve(estimate, x, sigmas, lambda i, D_c, D_u: cfg(D_c, D_u, 1.0), order,
                 progress=progress)


def text_estimate(model, text, mask, autocast_dtype=None):
    """estimate(x, sigma) -> (D_c, D_u) of a text-conditioned model: one batched forward of 2B
    examples per step, the prompts and then the same prompts under the null condition (every text
    key masked, model.null_condition)."""
    text2 = torch.cat([text, text])
    mask2 = torch.cat([mask, null_condition(mask)])

    def estimate(x, sigma):
        with torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            D = model_denoise(model, torch.cat([x, x]), sigma, text2, mask2)
        D_c, D_u = D.to(x.dtype).chunk(2)
        return D_c, D_u
    return estimate


def noise_from_seeds(seeds, shape, device="cpu"):
    """Initial noise [len(seeds), *shape], example k drawn from its own seed: the same seed gives
    the same noise whatever the batch it sits in (same-noise win rates, DDP sharding)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


@torch.no_grad()
def sample(model, noise, text, mask, steps=40, sigma_min=0.002, sigma_max=80.0, rho=7.0,
           cfg_scale=1.0, cfg_rescale=0.0, cfgpp_lambda=0.0, cfgpp_range=(0.0, 0.0),
           cfgpp_correction="uncond", order=2, autocast_dtype=None, progress=False):
    """Generate latents [B, C, T] from unit-variance noise [B, C, T] and prompts (text, mask).

    Deterministic: the same noise and prompts give the same output. No activations are kept.
    The keyword arguments are the `sampler` section of config.yaml."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    mode = guidance_schedule(steps, cfg_scale, cfgpp_lambda, cfgpp_range, cfg_rescale)
    x = noise.float() * sigmas[0].item()
    estimate = text_estimate(model, text, mask, autocast_dtype)
    return solve(estimate, x, sigmas, mode, order, cfgpp_correction, progress)


@torch.no_grad()
def generate_latents(model, prompts, seeds, T, text_encoder, sampler_cfg, device, batch=80,
                     bf16=False, rank=0, world=1):
    """Latents [N, C, T] (on the CPU) for prompts, each from its own seed's noise
    (noise_from_seeds), with the sampler settings sampler_cfg (the `sampler` section of
    config.yaml); bf16 autocast if bf16. Under torchrun (world > 1) each rank samples its shard
    and all ranks gather the N."""
    if world > 1:
        s = rank_shard(len(prompts), rank, world)
        mine = generate_latents(model, prompts[s], seeds[s], T, text_encoder, sampler_cfg, device,
                                batch, bf16)
        return gather(mine, world)
    # a rank with no prompts returns none
    out = [torch.zeros(0, model.config.latent_channels, T)]
    for i in range(0, len(prompts), batch):
        text, mask = text_encoder(prompts[i:i + batch])
        noise = noise_from_seeds(seeds[i:i + batch], (model.config.latent_channels, T), device)
        out.append(sample(model, noise, text.to(device), mask.to(device), **sampler_cfg,
                          autocast_dtype=torch.bfloat16 if bf16 else None).cpu())
    return torch.cat(out)
