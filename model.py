"""The generator: an EDM-preconditioned diffusion transformer (DiT) over 1-D codec latents.

Read next to the EDM paper (Karras et al. 2022, Table 1), which DRAGON follows. The network F
sees a noisy latent sequence x [B, C, T], the noise level through c_noise = 1/4 ln(sigma), and
text as a sequence of frozen text-encoder token states with a padding mask. The paper's denoiser is

    D(x; sigma, c) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), c)

and the training loss weighted by lambda(sigma) = 1 / c_out^2 is an MSE in F's output space.
DRAGON (dragon.py) builds its losses on the per-example version of that error,
`loss_per_example`, which therefore accepts the caller's sigma and noise.

Architecture (paper: log-sigma embedding through adaptive layer norm; text tokens concatenated
with the audio tokens as keys/values of every attention layer):
  latent [B, C, T] --1-D patching--> tokens [B, T/p, W] (+ fixed sinusoidal positions)
  c_noise --sinusoidal--> MLP --> emb [B, W]  --> adaLN-Zero shift/scale/gate in every block
  text [B, L, D_text] --LayerNorm, Linear--> [B, L, W] --per-block Linear--> extra keys/values
The CFG null condition is "every text key masked" (mask all False): the same tensor shape, no
learned null token, used identically by training-time condition dropout and by the sampler.
"""
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class DiTConfig:
    latent_channels: int = 32   # C, the codec's latent dimension (data.py decides it)
    patch: int = 2              # latent frames per token (1-D patching)
    width: int = 192            # W, transformer width
    depth: int = 6              # number of DiT blocks
    heads: int = 6              # attention heads; width must divide evenly
    mlp_ratio: float = 4.0      # hidden size of each block's MLP, as a multiple of width
    text_dim: int = 384         # D_text, width of the frozen text encoder's token states
    sigma_data: float = 0.5     # sigma_d of EDM (paper value), shared by model, loss and sampler

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be divisible by "
                             f"model.heads={self.heads}")
        for key in ("latent_channels", "patch", "width", "depth", "heads", "text_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be a positive integer, got "
                                 f"{getattr(self, key)}")
        if self.sigma_data <= 0:
            raise ValueError(f"model.sigma_data must be > 0, got {self.sigma_data}")


# ---------------------------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022, Table 1)
# ---------------------------------------------------------------------------------------------

def edm_scalings(sigma, sigma_data):
    """c_skip, c_out, c_in, c_noise of EDM for a tensor of noise levels sigma."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_weight(sigma, sigma_data):
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 = 1 / c_out^2 (EDM, Table 1). The
    reference form: loss_per_example applies it implicitly, as an MSE in F's output space."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_sigma(n, P_mean, P_std, generator=None, device="cpu"):
    """Training noise levels: ln sigma ~ N(P_mean, P_std^2) (paper: -0.4, 1.0; EDM2's triple)."""
    return (P_mean + P_std * torch.randn(n, generator=generator, device=device)).exp()


def _per_example_sigma(sigma, x):
    """Broadcast a scalar or [B] sigma to [B, 1, 1] in x's dtype and device."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(-1, 1, 1).expand(x.shape[0], 1, 1)


def denoise(model, x, sigma, text, mask):
    """D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c). sigma: scalar or [B]."""
    sigma = _per_example_sigma(sigma, x)
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, model.config.sigma_data)
    F_x = model(c_in * x, c_noise.reshape(-1), text, mask)
    return c_skip * x + c_out * F_x.to(x.dtype)


def loss_per_example(model, x0, text, mask, sigma, noise):
    """e(x0) = lambda(sigma) mean((D - x0)^2) = mean((F - F*)^2), one value per example [B].

    F* = (x0 - c_skip (x0 + sigma n)) / c_out is the network output that would make D exact.
    The mean (not sum) over elements is our choice (the paper does not say); DRAGON's A_theta
    (Eq. 7) and its DPO/KTO losses (Eqs. 6, 8) consume this vector with the caller's sigma and
    noise.
    """
    s = _per_example_sigma(sigma, x0)
    sigma_data = getattr(model, "module", model).config.sigma_data   # model may be DDP-wrapped
    c_skip, c_out, c_in, c_noise = edm_scalings(s, sigma_data)
    x = x0 + s * noise
    F_target = (x0 - c_skip * x) / c_out
    F_x = model(c_in * x, c_noise.reshape(-1), text, mask).float()
    return (F_x - F_target.float()).pow(2).mean(dim=(1, 2))


def drop_condition(mask, p, generator=None):
    """Condition dropout (paper: 10% in all training): replace whole prompts by the null condition.

    The null condition is 'all text keys masked', exactly what the sampler feeds the
    unconditional half of its batched CFG forward.
    """
    keep = torch.rand(mask.shape[0], generator=generator, device=mask.device) >= p
    return mask & keep[:, None]


def null_condition(mask):
    """The CFG null condition: every text key masked."""
    return torch.zeros_like(mask, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------
# The network F
# ---------------------------------------------------------------------------------------------

def sinusoidal(values, dim, max_period=10000.0):
    """[N] -> [N, dim] sinusoidal features (EDM's embedding of c_noise, and of positions)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(h, shift, scale):
    """adaLN: LayerNorm output shifted and scaled per example by the noise embedding."""
    return h * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """Self-attention over audio tokens with text tokens as extra keys/values, then an MLP;
    both residual branches modulated by adaLN-Zero (shift, scale, gate from the noise embedding)."""

    def __init__(self, cfg):
        super().__init__()
        W = cfg.width
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(W, 3 * W)
        self.kv_text = nn.Linear(W, 2 * W)   # text tokens -> keys/values of this layer (paper)
        self.proj = nn.Linear(W, W)
        self.norm2 = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        hidden = int(W * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(W, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, W))
        self.adaLN = nn.Linear(W, 6 * W)     # zero-initialised: the block starts as the identity
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)

    def attention(self, h, text, key_mask):
        B, N, W = h.shape
        L, H = text.shape[1], self.heads
        q, k, v = self.qkv(h).view(B, N, 3, H, W // H).permute(2, 0, 3, 1, 4)
        k_text, v_text = self.kv_text(text).view(B, L, 2, H, W // H).permute(2, 0, 3, 1, 4)
        k = torch.cat([k, k_text], dim=2)    # queries: audio only; keys/values: audio + text
        v = torch.cat([v, v_text], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(B, N, W))

    def forward(self, h, emb, text, key_mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(F.silu(emb)).chunk(6, dim=1)
        h = h + gate1[:, None, :] * self.attention(modulate(self.norm1(h), shift1, scale1), text,
                                                   key_mask)
        h = h + gate2[:, None, :] * self.mlp(modulate(self.norm2(h), shift2, scale2))
        return h


class DiT(nn.Module):
    """F(x_in; c_noise, text, mask) -> [B, C, T]. Use `denoise` for the preconditioned D."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        W, C, p = cfg.width, cfg.latent_channels, cfg.patch
        self.patch_in = nn.Linear(C * p, W)
        self.noise_mlp = nn.Sequential(nn.Linear(W, W), nn.SiLU(), nn.Linear(W, W))
        self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, W))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(W, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Linear(W, 2 * W)
        self.patch_out = nn.Linear(W, C * p)
        for layer in (self.adaLN_out, self.patch_out):   # zero-initialised final layer: F = 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.grad_checkpointing = False   # trade compute for memory in training (config switch)

    def forward(self, x_in, c_noise, text, mask):
        B, C, T = x_in.shape
        p = self.config.patch
        if C != self.config.latent_channels or T % p:
            raise ValueError(f"latent of shape {tuple(x_in.shape)} does not fit the model: "
                             f"needs {self.config.latent_channels} channels and a length divisible "
                             f"by patch={p}")
        dtype = self.patch_in.weight.dtype
        # 1-D patching: p consecutive latent frames -> one token
        tokens = x_in.to(dtype).reshape(B, C, T // p, p).permute(0, 2, 1, 3)
        tokens = tokens.reshape(B, T // p, C * p)
        h = self.patch_in(tokens)
        h = h + sinusoidal(torch.arange(T // p, device=h.device), h.shape[-1]).to(h.dtype)
        # noise level: c_noise = 1/4 ln sigma -> sinusoidal -> MLP (EDM; paper: adaptive layer norm)
        emb = self.noise_mlp(sinusoidal(c_noise, h.shape[-1]).to(h.dtype))
        text = self.text_in(text.to(dtype))
        key_mask = torch.cat([torch.ones(B, T // p, dtype=torch.bool, device=h.device),
                              mask.bool()], dim=1)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, emb, text, key_mask,
                                                      use_reentrant=False)
            else:
                h = block(h, emb, text, key_mask)
        shift, scale = self.adaLN_out(F.silu(emb)).chunk(2, dim=1)
        out = self.patch_out(modulate(self.norm_out(h), shift, scale))
        return out.reshape(B, T // p, C, p).permute(0, 2, 1, 3).reshape(B, C, T)


@torch.no_grad()
def update_ema(ema, model, decay):
    """Exponential moving average of the weights: ema <- decay ema + (1 - decay) model."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Checkpoints: plain dicts of tensors and primitives, loadable with torch.load(weights_only=True)
# ---------------------------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: a crash mid-write
    leaves the previous file intact."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_model(path, model, **extra):
    """Write the model's config and weights (plus any extra primitives/tensors) atomically."""
    save_atomic({"model_config": asdict(model.config), "model": model.state_dict(), **extra}, path)


def load_or_fit(path, key, fit, rank=0):
    """The dict cached at path when it was made with `key`, else fit()'s dict, saved there (by
    rank 0) with the key: fitted reward models and reference statistics are made again when
    anything they depend on changes."""
    if os.path.isfile(path):
        cached = load_checkpoint(path)
        if cached.get("key") == key:
            return cached
    value = dict(fit(), key=key)
    if rank == 0:
        save_atomic(value, path)
    return value


def load_checkpoint(path, map_location="cpu"):
    """The raw checkpoint dict, read safely (weights_only=True); a clear error if it is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise RuntimeError(f"checkpoint {path} could not be read: {e}") from e


def load_model(path, map_location="cpu"):
    """Rebuild the DiT from a checkpoint written by save_model; returns (model, checkpoint dict)."""
    ckpt = load_checkpoint(path, map_location)
    if "model_config" not in ckpt or "model" not in ckpt:
        raise RuntimeError(f"checkpoint {path} has no 'model_config'/'model' entries: not a "
                           f"DiT checkpoint")
    model = DiT(DiTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(map_location), ckpt
