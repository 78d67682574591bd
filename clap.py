"""CLAP, the audio-text encoder behind the aesthetics predictor, CLAP score and the CLAP-based FADs.

Offline (clap.kind: small): a small audio-text contrastive model (SmallClap) fitted here on the
training corpus's clips and captions with the symmetric InfoNCE loss of CLIP/CLAP, once, then
cached in out_dir/rewards/clap.pt with the config it was fitted with. At real scale (clap.kind:
hf): transformers' ClapModel from a folder or cached hub name (e.g. laion/larger_clap_music).
Both give window embeddings [B, windows, d] of audio and an embedding of each caption.
"""
import functools
import hashlib
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import caption_for, load_corpus
from encoders import TextEncoder, load_pretrained, make_codec
from model import load_or_fit

CAPTION_VARIANTS = 2    # differently phrased captions per training clip, so paraphrases embed alike
CAPTION_TOKENS = 64     # caption tokens the text tower sees: captions with two defects need
                        # about 40
MEL_NOISE = 0.1         # noise added to training windows, for robustness to codec artifacts
QUALITY_WORDS = {"off_scale": "with wrong notes", "detune": "out of tune",
                 "hiss": "with background hiss", "clipping": "distorted and clipped",
                 "jitter": "with sloppy timing", "dropout": "with dropouts"}


class SmallClap(nn.Module):
    """Audio tower: 1-D convolutions over normalised log-mel windows -> d-dim embedding.
    Text tower: the frozen text encoder's token states, mean-pooled -> MLP -> d-dim embedding.
    Both L2-normalised; trained with the symmetric InfoNCE loss (CLIP/CLAP)."""

    def __init__(self, n_mels=32, text_dim=384, dim=64, width=128, window_frames=32, hop_frames=16):
        super().__init__()
        self.config = dict(n_mels=n_mels, text_dim=text_dim, dim=dim, width=width,
                           window_frames=window_frames, hop_frames=hop_frames)
        self.audio_tower = nn.Sequential(
            nn.Conv1d(n_mels, width, 3, padding=1), nn.GELU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.GELU())
        self.audio_proj = nn.Linear(width, dim)
        self.text_tower = nn.Sequential(nn.Linear(text_dim, 2 * width), nn.GELU(),
                                        nn.Linear(2 * width, dim))
        self.log_temp = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def windows(self, mel):
        """[B, n_mels, T] -> [B, W, n_mels, window] fixed, deterministic windows."""
        w, h = self.config["window_frames"], self.config["hop_frames"]
        if mel.shape[-1] < w:
            raise ValueError(f"clip has {mel.shape[-1]} mel frames, fewer than one CLAP window "
                             f"({w})")
        return mel.unfold(-1, w, h).permute(0, 2, 1, 3)

    def embed_mel_windows(self, win):
        """[N, n_mels, window] -> [N, dim] normalised."""
        return F.normalize(self.audio_proj(self.audio_tower(win).mean(-1)), dim=-1)

    def embed_text_states(self, text, mask):
        pooled = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_tower(pooled), dim=-1)


def fit_small_clap(cfg, mel_codec, text_encoder, rank=0):
    """Fit SmallClap on the training split: each step pairs one random window of each clip with its
    caption (synthetic data: a freshly phrased caption of its attributes plus its defects in words,
    so the embedding hears quality too; real data: the caption of its file). Returns (model, report
    with held-out retrieval accuracy)."""
    cc = cfg["clap"]
    g = torch.Generator().manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    corpus = load_corpus(cfg["data"], "train")
    mel = torch.cat([mel_codec.encode(corpus.audio[i:i + 512]) for i in range(0, len(corpus), 512)])

    def describe(i):
        # real data: the captions file's caption as written
        if not corpus.attributes:
            return corpus.captions[i]
        words = [QUALITY_WORDS[d] for d in corpus.defects[i]]
        return caption_for(corpus.attributes[i], rng) + (", " + ", ".join(words) if words else "")
    variants = [[describe(i) for i in range(len(corpus))] for _ in range(CAPTION_VARIANTS)]
    states = [text_encoder(v) for v in variants]
    # a caption that says "with dropouts" describes the window that holds one: such clips are cut
    # around their quietest frame (a dropout silences even the noise floor); other clips anywhere
    at = torch.tensor([int("dropout" in d) for d in corpus.defects] or [0] * len(corpus)).bool()
    quietest = torch.where(at, mel.sum(1).argmin(-1), -1)

    with torch.random.fork_rng(devices=[]):
        # the same initial weights whatever ran before in this process
        torch.manual_seed(cfg["seed"])
        model = SmallClap(mel.shape[1], text_encoder.dim, window_frames=cc["window_frames"],
                          hop_frames=cc["hop_frames"])
    model.to(mel_codec.device)
    opt = torch.optim.Adam(model.parameters(), lr=cc["lr"])
    bar = tqdm(range(cc["steps"]), desc="fit CLAP", disable=rank != 0, dynamic_ncols=True)
    with torch.enable_grad():
        for _ in bar:
            clap_step(model, opt, mel, quietest, states, cc, g, rng, bar)
    model.eval()
    return model, clap_retrieval(model, mel_codec, text_encoder, cfg)


def clap_step(model, opt, mel, quietest, states, cc, g, rng, bar):
    """One symmetric InfoNCE step on B random windows and one phrasing of their captions; a window
    of a clip with a frame in `quietest` (>= 0) holds that frame."""
    B, w = cc["batch_size"], cc["window_frames"]
    idx = torch.randperm(len(mel), generator=g)[:B]
    B = len(idx)                                  # a corpus smaller than the batch: all of it
    start = torch.randint(0, mel.shape[-1] - w + 1, (B,), generator=g)
    q = quietest[idx]
    around = (q - torch.randint(0, w, (B,), generator=g)).clamp(0, mel.shape[-1] - w)
    start = torch.where(q >= 0, around, start)
    win = torch.stack([mel[i, :, s:s + w] for i, s in zip(idx.tolist(), start.tolist())])
    win = win + MEL_NOISE * torch.randn(win.shape, generator=g)        # robust to codec artifacts
    text, mask = states[int(rng.integers(len(states)))]
    device = model.log_temp.device
    a = model.embed_mel_windows(win.to(device))
    t = model.embed_text_states(text[idx].to(device), mask[idx].to(device))
    logits = model.log_temp.exp().clamp(max=100) * a @ t.T
    labels = torch.arange(B, device=device)
    # symmetric InfoNCE
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def clap_check_split(data_cfg):
    """The split the offline CLAP's fit is checked on: synthetic data's validation split; on a
    folder corpus data.valid_captions, else data.test_captions, an error when neither is set (also
    raised by rewards.check_reward_inputs before any model is fitted)."""
    if data_cfg["source"] != "folder":
        return "valid"
    split = "valid" if data_cfg["valid_captions"] else "test"
    if not data_cfg[f"{split}_captions"]:
        raise ValueError("clap.kind=small on data.source=folder checks its fit on held-out files: "
                         "set data.valid_captions or data.test_captions")
    return split


def clap_retrieval(model, mel_codec, text_encoder, cfg, n=100):
    """Held-out retrieval: each of n validation clips' embedding ranks their distinct captions (the
    windows of one real file share one); a hit is its own caption among the top k. Real data is
    checked on data.valid_captions, else data.test_captions."""
    corpus = load_corpus(cfg["data"], clap_check_split(cfg["data"]), n=n)
    # spread over files
    idx = torch.linspace(0, len(corpus) - 1, min(n, len(corpus))).round().long().unique()
    captions = [corpus.captions[i] for i in idx.tolist()]
    # windows of one real file share a caption
    unique = list(dict.fromkeys(captions))
    enc = ClapEncoder(model, mel_codec, text_encoder)
    a = enc.audio_embedding(corpus.audio[idx])
    t = enc.text_embedding(unique)
    rank = (a @ t.T).argsort(dim=1, descending=True)
    hits = rank == torch.tensor([unique.index(c) for c in captions])[:, None]
    return {"top1": float(hits[:, :1].any(1).float().mean()),
            "top5": float(hits[:, :5].any(1).float().mean()),
            "chance_top1": 1 / len(unique), "chance_top5": min(1.0, 5 / len(unique)), "n": len(idx),
            "captions": len(unique)}


class ClapEncoder:
    """The offline CLAP behind the same interface as the real one."""

    def __init__(self, model, mel_codec, text_encoder):
        self.model, self.mel, self.text_encoder = model, mel_codec, text_encoder
        self.sample_rate = mel_codec.sample_rate
        self.dim = model.config["dim"]
        self.identity = {"kind": "small", "weights": weights_hash(model),
                         "window_frames": model.config["window_frames"],
                         "hop_frames": model.config["hop_frames"], "sample_rate": self.sample_rate}

    @torch.no_grad()
    def window_embeddings(self, audio):
        """audio [B, samples] at self.sample_rate -> [B, W, dim]."""
        win = self.model.windows(self.mel.encode(audio).to(self.mel.device))
        B, W = win.shape[:2]
        return (self.model.embed_mel_windows(win.reshape(B * W, *win.shape[2:]))
                .reshape(B, W, self.dim).cpu())

    @torch.no_grad()
    def text_embedding(self, prompts):
        text, mask = self.text_encoder(prompts)
        return self.model.embed_text_states(text.to(self.mel.device),
                                            mask.to(self.mel.device)).cpu()

    def audio_embedding(self, audio):
        """One embedding per clip: the normalised mean of its window embeddings."""
        return F.normalize(self.window_embeddings(audio).mean(1), dim=-1)


class HFClapEncoder:
    """Real CLAP through transformers' ClapModel (e.g. laion/larger_clap_music): 48 kHz input cut
    into fixed 10 s windows with a 1 s hop by us (no random crops), L2-normalised embeddings."""

    def __init__(self, path, window_seconds=10.0, hop_seconds=1.0, device="cpu"):
        from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel
        self.model = load_pretrained(ClapModel, path, "clap.path").to(device).eval()
        self.features = load_pretrained(ClapFeatureExtractor, path, "clap.path")
        self.tokenizer = load_pretrained(AutoTokenizer, path, "clap.path")
        if len(self.tokenizer) < 1000:
            raise RuntimeError(f"clap.path={path!r}: tokenizer has only {len(self.tokenizer)} "
                               "tokens")
        self.sample_rate = self.features.sampling_rate
        self.window, self.hop = (int(window_seconds * self.sample_rate),
                                 int(hop_seconds * self.sample_rate))
        self.dim = self.model.config.projection_dim
        self.device = device
        self.identity = {"kind": "hf", "path": path, "window_seconds": window_seconds,
                         "hop_seconds": hop_seconds, "sample_rate": self.sample_rate}

    @staticmethod
    def _pooled(out):
        return out.pooler_output if hasattr(out, "pooler_output") else out

    @torch.no_grad()
    def window_embeddings(self, audio):
        audio = torch.as_tensor(audio).float()
        n = audio.shape[-1]
        starts = list(range(0, max(n - self.window, 0) + 1, self.hop))
        wins = [audio[b, s:s + self.window].numpy() for b in range(len(audio)) for s in starts]
        inputs = self.features(wins, sampling_rate=self.sample_rate, return_tensors="pt",
                               padding="repeatpad", truncation="rand_trunc")
        emb = self._pooled(self.model.get_audio_features(
            input_features=inputs["input_features"].to(self.device)))
        return F.normalize(emb.float(), dim=-1).reshape(len(audio), len(starts), self.dim).cpu()

    @torch.no_grad()
    def text_embedding(self, prompts):
        batch = self.tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
        emb = self._pooled(self.model.get_text_features(**batch))
        return F.normalize(emb.float(), dim=-1).cpu()

    def audio_embedding(self, audio):
        return F.normalize(self.window_embeddings(audio).mean(1), dim=-1)


def weights_hash(model):
    h = hashlib.sha1()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def reward_dir(cfg):
    return os.path.join(cfg["out_dir"], "rewards")


@functools.lru_cache(maxsize=4)
def clap_text_encoder(name, max_tokens, device="cpu"):
    """The offline CLAP's text tower input: the generator's text encoder, but with room for its
    longer captions (attributes plus defect words), so no defect word is cut off."""
    return TextEncoder(name, max_tokens, device)


def load_or_fit_clap(cfg, rank=0, device="cpu"):
    """The CLAP of the config on `device`: the offline SmallClap (fitted once, then loaded from
    out_dir/rewards/clap.pt) or a pretrained ClapModel from clap.path."""
    cc = cfg["clap"]
    if cc["kind"] == "hf":
        return HFClapEncoder(cc["path"], cc["window_seconds"], cc["hop_seconds"], device)
    if cc["kind"] != "small":
        raise ValueError(f"clap.kind must be 'small' or 'hf', got {cc['kind']!r}")
    text_encoder = clap_text_encoder(cfg["text_encoder"]["name"], CAPTION_TOKENS, device)
    # its front end is the mel transform of the codec section (whatever codec the generator uses)
    mel = make_codec(dict(cfg, codec=dict(cfg["codec"], kind="mel", griffin_lim_iters=0)), device)
    path = os.path.join(reward_dir(cfg), "clap.pt")
    fitted_on = {"clap": {k: v for k, v in cc.items() if k not in ("kind", "path")},
                 "data": cfg["data"], "codec": cfg["codec"], "seed": cfg["seed"],
                 "text_encoder": cfg["text_encoder"]}

    def fit():
        t0 = time.time()
        model, r = fit_small_clap(cfg, mel, text_encoder, rank)
        if rank == 0:
            tqdm.write(f"offline CLAP fitted in {time.time() - t0:.0f}s: held-out retrieval top-1 "
                       f"{r['top1']:.1%} (chance {r['chance_top1']:.1%}), top-5 {r['top5']:.1%} "
                       f"(chance {r['chance_top5']:.1%}); saved to {path}")
        return {"config": model.config, "model": model.state_dict(), "report": r}
    fitted = load_or_fit(path, fitted_on, fit, rank)       # refit when its config changed
    model = SmallClap(**fitted["config"])
    model.load_state_dict(fitted["model"])
    return ClapEncoder(model.to(mel.device).eval(), mel, text_encoder)
