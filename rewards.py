"""Rewards: what DRAGON optimises. Read next to the paper's reward types and exemplar rewards.

Every reward is higher-is-better and has one of the paper's four types:
  instance                     r(x)      aesthetics predictor (audio only, the prompt unseen)
  instance-to-instance         r(x, c)   CLAP score: cosine of audio and prompt embeddings
  instance-to-distribution     r(x, R)   per-song FAD: one clip's frames vs a reference set R
  distribution                 r(S, R)   dataset FAD of a set S vs R;  r(S): Vendi diversity
An exemplar reward is an encoder E plus a reference set R; with the cross-modal CLAP the
references may be captions (text) while the generations are audio.

Encoders (the E of an exemplar reward), each giving frame embeddings [B, frames, d] per clip:
  latent  the generator's own codec latents, one embedding per latent frame (the paper's VAE-FAD)
  clap    CLAP window embeddings: offline, a small audio-text model fitted here on the synthetic
          corpus (SmallClap); at real scale, transformers' ClapModel from a folder or hub name.
"""
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import (EXEMPLAR_RESTRICT, caption_for, check_finite, folder_corpus, load_corpus, load_pretrained, make_codec,
                  read_prompts, resample)
from model import load_checkpoint, save_atomic

# =============================================================================================
# Frechet distance (FAD, Kilgour et al. 2019) and Vendi score (Friedman & Dieng 2023)
# =============================================================================================

def _f64(x):
    """numpy or torch input -> float64 tensor."""
    return torch.as_tensor(x).to(torch.float64)


def sqrtm_psd(S):
    """Symmetric PSD square root through eigh, negative round-off eigenvalues clamped at 0."""
    lam, V = torch.linalg.eigh(S)
    return (V * lam.clamp(min=0).sqrt().unsqueeze(-2)) @ V.transpose(-1, -2)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FD = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1 S2)^(1/2), in float64.

    tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i) with lambda = eig(S1^(1/2) S2 S1^(1/2)): a symmetric PSD
    matrix, so eigh applies and the result stays real for rank-deficient covariances."""
    mu1, sigma1, mu2, sigma2 = map(_f64, (mu1, sigma1, mu2, sigma2))
    root1 = sqrtm_psd(sigma1)
    lam = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0)
    return float((mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * lam.sqrt().sum())


def frechet_to_reference(mu, sigma, ref):
    """Batched FD of B Gaussians (mu [B, d], sigma [B, d, d]) to one reference (a dict from
    gaussian_stats): the reference's square root is computed once, one batched eigh for all B."""
    mu, sigma = _f64(mu), _f64(sigma)
    root = ref["sigma_sqrt"]
    lam = torch.linalg.eigvalsh(root @ sigma @ root).clamp(min=0)
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (mu - ref["mu"]).pow(2).sum(-1) + trace + ref["sigma"].trace() - 2 * lam.sqrt().sum(-1)


def gaussian_stats(frames):
    """mean and unbiased covariance of frames [N, d] (float64), with the covariance's square root."""
    x = _f64(frames)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 frames for a covariance, got {x.shape[0]}")
    mu = x.mean(0)
    sigma = (x - mu).T @ (x - mu) / (x.shape[0] - 1)
    return {"mu": mu, "sigma": sigma, "sigma_sqrt": sqrtm_psd(sigma)}


def vendi_score(embeddings):
    """Vendi (q = 1): exp(-sum lambda log lambda), lambda = eig(K / n), K the cosine kernel of the
    L2-normalised embeddings [n, d]."""
    x = F.normalize(_f64(embeddings), dim=1)
    lam = torch.linalg.eigvalsh(x @ x.T / x.shape[0]).clamp(min=0)
    lam = lam[lam > 1e-12]
    return float(torch.exp(-(lam * lam.log()).sum()))


# =============================================================================================
# The offline CLAP: a small audio-text contrastive model fitted on the synthetic corpus
# =============================================================================================

QUALITY_WORDS = {"off_scale": "with wrong notes", "detune": "out of tune", "hiss": "with background hiss",
                 "clipping": "distorted and clipped", "jitter": "with sloppy timing", "dropout": "with dropouts"}


class SmallClap(nn.Module):
    """Audio tower: 1-D convolutions over normalised log-mel windows -> d-dim embedding.
    Text tower: the frozen text encoder's token states, mean-pooled -> MLP -> d-dim embedding.
    Both L2-normalised; trained with the symmetric InfoNCE loss (CLIP/CLAP)."""

    def __init__(self, n_mels=32, text_dim=384, dim=64, width=128, window_frames=32, hop_frames=16):
        super().__init__()
        self.config = dict(n_mels=n_mels, text_dim=text_dim, dim=dim, width=width, window_frames=window_frames,
                           hop_frames=hop_frames)
        self.audio_tower = nn.Sequential(
            nn.Conv1d(n_mels, width, 3, padding=1), nn.GELU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1), nn.GELU())
        self.audio_proj = nn.Linear(width, dim)
        self.text_tower = nn.Sequential(nn.Linear(text_dim, 2 * width), nn.GELU(), nn.Linear(2 * width, dim))
        self.log_temp = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def windows(self, mel):
        """[B, n_mels, T] -> [B, W, n_mels, window] fixed, deterministic windows."""
        w, h = self.config["window_frames"], self.config["hop_frames"]
        if mel.shape[-1] < w:
            raise ValueError(f"clip has {mel.shape[-1]} mel frames, fewer than one CLAP window ({w})")
        return mel.unfold(-1, w, h).permute(0, 2, 1, 3)

    def embed_mel_windows(self, win):
        """[N, n_mels, window] -> [N, dim] normalised."""
        return F.normalize(self.audio_proj(self.audio_tower(win).mean(-1)), dim=-1)

    def embed_text_states(self, text, mask):
        pooled = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_tower(pooled), dim=-1)


def fit_small_clap(cfg, mel_codec, text_encoder, rank=0):
    """Fit SmallClap on the training split: each step pairs one random window of each clip with a
    freshly phrased caption of its attributes (plus its defects in words, so the embedding
    hears quality too). Returns (model, report with held-out retrieval accuracy)."""
    cc = cfg["clap"]
    g = torch.Generator().manual_seed(cfg["seed"])
    rng = np.random.default_rng(cfg["seed"])
    corpus = load_corpus(cfg["data"], "train")
    if not corpus.attributes:
        raise ValueError("clap.kind=small is fitted on the synthetic corpus; with data.source=folder "
                         "use clap.kind=hf and a pretrained CLAP in clap.path")
    mel = torch.cat([mel_codec.encode(corpus.audio[i:i + 512]) for i in range(0, len(corpus), 512)])

    def describe(i):
        words = [QUALITY_WORDS[d] for d in corpus.defects[i]]
        return caption_for(corpus.attributes[i], rng) + (", " + ", ".join(words) if words else "")
    variants = [[describe(i) for i in range(len(corpus))] for _ in range(cc["caption_variants"])]
    states = [text_encoder(v) for v in variants]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["seed"])            # the same initial weights whatever ran before in this process
        model = SmallClap(mel.shape[1], text_encoder.dim, cc["dim"], cc["width"], cc["window_frames"], cc["hop_frames"])
    opt = torch.optim.Adam(model.parameters(), lr=cc["lr"])
    bar = tqdm(range(cc["steps"]), desc="fit CLAP", disable=rank != 0, dynamic_ncols=True)
    with torch.enable_grad():
        for _ in bar:
            clap_step(model, opt, mel, states, cc, g, rng, bar)
    model.eval()
    return model, clap_retrieval(model, mel_codec, text_encoder, cfg)


def clap_step(model, opt, mel, states, cc, g, rng, bar):
    """One symmetric InfoNCE step on B random windows and one phrasing of their captions."""
    B, w = cc["batch_size"], cc["window_frames"]
    idx = torch.randperm(len(mel), generator=g)[:B]
    start = torch.randint(0, mel.shape[-1] - w + 1, (B,), generator=g)
    win = torch.stack([mel[i, :, s:s + w] for i, s in zip(idx.tolist(), start.tolist())])
    win = win + cc["mel_noise"] * torch.randn(win.shape, generator=g)   # robust to codec artifacts
    text, mask = states[int(rng.integers(len(states)))]
    a = model.embed_mel_windows(win)
    t = model.embed_text_states(text[idx], mask[idx])
    logits = model.log_temp.exp().clamp(max=100) * a @ t.T
    labels = torch.arange(B)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2   # symmetric InfoNCE
    opt.zero_grad()
    loss.backward()
    opt.step()
    bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def clap_retrieval(model, mel_codec, text_encoder, cfg, n=100):
    """Held-out retrieval: each validation clip's embedding ranks the captions of n clips."""
    corpus = load_corpus(cfg["data"], "valid", n=n)
    enc = ClapEncoder(model, mel_codec, text_encoder)
    a = enc.audio_embedding(corpus.audio)
    t = enc.text_embedding(corpus.captions)
    rank = (a @ t.T).argsort(dim=1, descending=True)
    hits = rank == torch.arange(n)[:, None]
    return {"top1": float(hits[:, :1].any(1).float().mean()), "top5": float(hits[:, :5].any(1).float().mean()),
            "chance_top1": 1 / n, "chance_top5": 5 / n, "n": n}


class ClapEncoder:
    """The offline CLAP behind the same interface as the real one."""

    def __init__(self, model, mel_codec, text_encoder):
        self.model, self.mel, self.text_encoder = model, mel_codec, text_encoder
        self.sample_rate = mel_codec.sample_rate
        self.dim = model.config["dim"]
        self.identity = {"kind": "small", "weights": weights_hash(model), "window_frames": model.config["window_frames"],
                         "hop_frames": model.config["hop_frames"], "sample_rate": self.sample_rate}

    @torch.no_grad()
    def window_embeddings(self, audio):
        """audio [B, samples] at self.sample_rate -> [B, W, dim]."""
        win = self.model.windows(self.mel.encode(audio))
        B, W = win.shape[:2]
        return self.model.embed_mel_windows(win.reshape(B * W, *win.shape[2:])).reshape(B, W, -1)

    @torch.no_grad()
    def text_embedding(self, prompts):
        text, mask = self.text_encoder(prompts)
        return self.model.embed_text_states(text, mask)

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
            raise RuntimeError(f"clap.path={path!r}: tokenizer has only {len(self.tokenizer)} tokens")
        self.sample_rate = self.features.sampling_rate
        self.window, self.hop = int(window_seconds * self.sample_rate), int(hop_seconds * self.sample_rate)
        self.dim = self.model.config.projection_dim
        self.device = device
        self.identity = {"kind": "hf", "path": path, "window_seconds": window_seconds, "hop_seconds": hop_seconds,
                         "sample_rate": self.sample_rate}

    @staticmethod
    def _pooled(out):
        return out.pooler_output if hasattr(out, "pooler_output") else out

    @torch.no_grad()
    def window_embeddings(self, audio):
        audio = torch.as_tensor(audio).float()
        n = audio.shape[-1]
        starts = list(range(0, max(n - self.window, 0) + 1, self.hop))
        wins = [audio[b, s:s + self.window].numpy() for b in range(len(audio)) for s in starts]
        inputs = self.features(wins, sampling_rate=self.sample_rate, return_tensors="pt", padding="repeatpad",
                               truncation="rand_trunc")
        emb = self._pooled(self.model.get_audio_features(input_features=inputs["input_features"].to(self.device)))
        return F.normalize(emb.float(), dim=-1).reshape(len(audio), len(starts), -1).cpu()

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


def load_or_fit_clap(cfg, text_encoder, rank=0):
    """The CLAP of the config: the offline SmallClap (fitted once, then loaded from
    out_dir/rewards/clap.pt) or a pretrained ClapModel from clap.path."""
    cc = cfg["clap"]
    if cc["kind"] == "hf":
        return HFClapEncoder(cc["path"], cc["window_seconds"], cc["hop_seconds"])
    if cc["kind"] != "small":
        raise ValueError(f"clap.kind must be 'small' or 'hf', got {cc['kind']!r}")
    # its front end is the mel transform of the codec section (whatever codec the generator uses)
    mel = make_codec(dict(cfg, codec=dict(cfg["codec"], kind="mel", griffin_lim_iters=0)))
    path = os.path.join(reward_dir(cfg), "clap.pt")
    fitted_on = {"clap": {k: v for k, v in cc.items() if k not in ("kind", "path")}, "data": cfg["data"],
                 "codec": cfg["codec"], "seed": cfg["seed"], "text_encoder": cfg["text_encoder"]}
    if os.path.isfile(path):
        ckpt = load_checkpoint(path)
        if ckpt.get("fitted_on") == fitted_on:          # refit when the config it was fitted with changed
            model = SmallClap(**ckpt["config"])
            model.load_state_dict(ckpt["model"])
            return ClapEncoder(model.eval(), mel, text_encoder)
    t0 = time.time()
    model, report = fit_small_clap(cfg, mel, text_encoder, rank)
    if rank == 0:
        save_atomic({"config": model.config, "model": model.state_dict(), "report": report, "fitted_on": fitted_on},
                    path)
        tqdm.write(f"offline CLAP fitted in {time.time() - t0:.0f}s: held-out retrieval top-1 {report['top1']:.1%} "
                   f"(chance {report['chance_top1']:.1%}), top-5 {report['top5']:.1%} (chance "
                   f"{report['chance_top5']:.1%}); saved to {path}")
    return ClapEncoder(model, mel, text_encoder)


# =============================================================================================
# The aesthetics predictor: frozen CLAP audio embedding -> kernel ridge regression (paper)
# =============================================================================================

def rbf_kernel(a, b, lengthscale):
    return torch.exp(-torch.cdist(_f64(a), _f64(b)).pow(2) / (2 * lengthscale ** 2))


def fit_kernel_ridge(X, y, lengthscale, ridge):
    """Dual coefficients alpha = (K + ridge I)^-1 y of kernel ridge regression (closed form)."""
    K = rbf_kernel(X, X, lengthscale)
    return torch.linalg.solve(K + ridge * torch.eye(len(K), dtype=K.dtype), _f64(y))


def per_group_srcc(pred, target, groups):
    """Mean Spearman correlation within groups of at least 3 clips (the paper's per-prompt SRCC;
    with unique synthetic captions a group is the clips sharing instrument and register)."""
    values = []
    for gname in set(groups):
        idx = [i for i, g in enumerate(groups) if g == gname]
        if len(idx) >= 3 and len(set(target[idx].tolist())) > 1:
            values.append(scipy.stats.spearmanr(pred[idx], target[idx]).statistic)
    return float(np.mean(values)) if values else float("nan")


def fit_aesthetics(cfg, embed_audio):
    """Fit on the rated training clips (at most aesthetics.max_clips), embedded exactly as
    generations are scored (embed_audio: codec round trip, then CLAP): ratings z-scored globally;
    85/15 split to choose the kernel lengthscale and report PLCC and per-prompt SRCC on the 15%;
    then refit on all."""
    ac = cfg["aesthetics"]
    corpus = load_corpus(cfg["data"], "train")
    rated = torch.isfinite(corpus.ratings).nonzero().flatten()[: ac["max_clips"]]
    if len(rated) < 20:
        raise ValueError(f"aesthetics: only {len(rated)} rated training clips; need at least 20")
    X = torch.cat([embed_audio(corpus.audio[rated[i:i + 128]]) for i in range(0, len(rated), 128)])
    y = corpus.ratings[rated].double()
    mean, std = float(y.mean()), float(y.std())
    y = (y - mean) / std
    perm = torch.randperm(len(rated), generator=torch.Generator().manual_seed(cfg["seed"]))
    n_val = int(round(ac["val_fraction"] * len(rated)))
    val, tr = perm[:n_val], perm[n_val:]
    groups = [f"{corpus.attributes[i]['instrument']}-{corpus.attributes[i]['register']}" if corpus.attributes
              else corpus.captions[i] for i in rated.tolist()]
    best = None
    for ls in ac["lengthscales"]:
        alpha = fit_kernel_ridge(X[tr], y[tr], ls, ac["ridge"])
        pred = rbf_kernel(X[val], X[tr], ls) @ alpha
        plcc = float(np.corrcoef(pred.numpy(), y[val].numpy())[0, 1])
        if best is None or plcc > best[1]:
            srcc = per_group_srcc(pred.numpy(), y[val].numpy(), [groups[i] for i in val.tolist()])
            best = (ls, plcc, srcc)
    ls, plcc, srcc = best
    alpha = fit_kernel_ridge(X, y, ls, ac["ridge"])       # refit on all rated clips
    return {"X": X, "alpha": alpha, "lengthscale": ls, "mean": mean, "std": std,
            "report": {"plcc": plcc, "srcc_per_prompt": srcc, "n_train": len(tr), "n_val": len(val), "lengthscale": ls}}


def load_or_fit_aesthetics(cfg, identity, embed_audio, rank=0):
    """The fitted head from out_dir/rewards/aesthetics.pt when it was fitted with this encoder
    (identity), else fit it now and save it."""
    path = os.path.join(reward_dir(cfg), "aesthetics.pt")
    if os.path.isfile(path):
        head = load_checkpoint(path)
        if head.get("identity") == identity:
            return head
    t0 = time.time()
    head = fit_aesthetics(cfg, embed_audio)
    head["identity"] = identity
    if rank == 0:
        save_atomic(head, path)
        r = head["report"]
        tqdm.write(f"aesthetics predictor fitted in {time.time() - t0:.0f}s: validation PLCC {r['plcc']:.3f}, "
                   f"per-prompt SRCC {r['srcc_per_prompt']:.3f} ({r['n_val']} held-out clips); saved to {path}")
    return head


def predict_aesthetics(head, embeddings):
    """Predicted rating on the 1-5 scale of the training ratings."""
    z = rbf_kernel(embeddings, head["X"], head["lengthscale"]) @ head["alpha"]
    return z * head["std"] + head["mean"]


# =============================================================================================
# Reference statistics of exemplar sets (audio or text), cached on disk with metadata
# =============================================================================================

def reference_items(cfg, reference):
    """'audio:NAME' -> a Corpus of exemplar clips; 'text:NAME' -> a list of captions. NAME is a
    synthetic exemplar set (alim, sd) or, for real data, a captions file / prompt file path."""
    kind, _, name = reference.partition(":")
    if kind not in ("audio", "text") or not name:
        raise ValueError(f"reward.reference must be 'audio:NAME' or 'text:NAME', got {reference!r}")
    n = cfg["reward"]["n_reference"]
    if name in EXEMPLAR_RESTRICT and cfg["data"]["source"] == "synthetic":
        corpus = load_corpus(cfg["data"], f"exemplar_{name}", n=n, restrict=EXEMPLAR_RESTRICT[name], p_defect=0.0)
        return kind, corpus if kind == "audio" else corpus.captions
    if kind == "text":
        return kind, read_prompts(name)
    d = cfg["data"]
    return kind, folder_corpus(name, d["sample_rate"], d["clip_seconds"], d["mono"], d["resample"])


def reference_stats(cfg, encoder, reference, embed_audio, rank=0):
    """Gaussian statistics of the reference set's embeddings: audio references give frame
    embeddings, text references one CLAP text embedding per caption. Cached in out_dir/rewards
    with metadata (encoder, windowing, sample rate, count); reused only when that matches."""
    meta = {"reference": reference, "encoder": encoder.identity, "n_reference": cfg["reward"]["n_reference"],
            "data_seed": cfg["data"]["seed"], "source": cfg["data"]["source"]}
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(reward_dir(cfg), f"ref_{reference.replace(':', '_').replace('/', '_')}.pt")
    if os.path.isfile(path):
        cached = load_checkpoint(path)
        if cached.get("meta_key") == key:
            return cached["stats"]
    kind, items = reference_items(cfg, reference)
    if len(items) == 0:
        raise ValueError(f"reward.reference={reference}: the exemplar set is empty")
    if kind == "text":
        if not hasattr(encoder, "text_embedding"):
            raise ValueError(f"reward.reference={reference}: text exemplars need a cross-modal encoder "
                             f"(reward.encoder=clap), not '{cfg['reward']['encoder']}'")
        frames = encoder.text_embedding(items)
    else:
        frames = torch.cat([embed_audio(items.audio[i:i + 128]).flatten(0, 1) for i in range(0, len(items), 128)])
    stats = gaussian_stats(frames)
    stats["count"] = len(items)
    if rank == 0:
        save_atomic({"meta_key": key, "meta": meta, "stats": stats}, path)
    return stats


# =============================================================================================
# One interface for train.py
# =============================================================================================

REWARD_TYPES = {"aesthetics": "instance", "clap_score": "instance-to-instance",
                "fad_per_song": "instance-to-distribution", "fad_dataset": "distribution",
                "vendi": "distribution"}


@dataclass
class Reward:
    """features(latents, prompts) -> per-example features (computed once per batch);
    instance types: score(features, prompts) -> [B];
    set types: set_scorer(features) -> r(members), a function of an index tensor into the batch
    that is cheap to call many times (dataset FAD sums per-example statistics once, so a swap
    costs one d x d eigendecomposition)."""
    name: str
    type: str
    features: object
    score: object = None
    set_scorer: object = None

    @property
    def is_set(self):
        return self.type == "distribution"

    def set_score(self, features):
        """r(S) of the whole batch of features."""
        return self.set_scorer(features)(torch.arange(len(features)))


def frame_features(codec, clap, encoder_name, reward_name):
    """The per-clip frame embeddings [B, frames, d] of the chosen encoder, from latents."""
    if encoder_name == "latent":
        def features(latents, prompts=None):
            check_finite(latents, f"reward {reward_name}", "examples")
            return latents.float().transpose(1, 2)           # one embedding per latent frame
        return features
    if encoder_name == "clap":
        def features(latents, prompts=None):
            check_finite(latents, f"reward {reward_name}", "examples")
            audio = codec.decode(latents)
            check_audible(audio, reward_name)
            return clap.window_embeddings(resample_for(audio, codec.sample_rate, clap.sample_rate))
        return features
    raise ValueError(f"reward.encoder must be 'latent' or 'clap', got {encoder_name!r}")


def resample_for(audio, sr_from, sr_to):
    return audio if sr_from == sr_to else torch.from_numpy(resample(audio.numpy(), sr_from, sr_to))


def check_audible(audio, name):
    check_finite(audio, f"reward {name}")
    silent = audio.abs().amax(dim=1) < 1e-5
    if silent.any():
        raise ValueError(f"reward {name}: clips {silent.nonzero().flatten().tolist()} are silent")


def per_song_fad(frames, ref, name="fad_per_song"):
    """-FAD of each clip's frames [B, n, d] against reference statistics, batched."""
    if frames.shape[1] < 2:
        raise ValueError(f"reward {name}: per-song FAD needs at least 2 frames per clip, got {frames.shape[1]}")
    if frames.shape[2] != ref["mu"].shape[0]:
        raise ValueError(f"reward {name}: embeddings have dimension {frames.shape[2]} but the reference statistics "
                         f"have {ref['mu'].shape[0]}; the cache was made with another encoder")
    x = _f64(frames)
    mu = x.mean(1)
    centred = x - mu[:, None]
    sigma = centred.transpose(1, 2) @ centred / (x.shape[1] - 1)
    return -frechet_to_reference(mu, sigma, ref).float()


def set_stats(frames):
    """Per-example sums (count, sum, sum of outer products) of frames [B, n, d]: adding or
    removing an example from a set is one addition, so greedy swapping is cheap."""
    x = _f64(frames)
    return {"n": torch.full((x.shape[0],), x.shape[1], dtype=torch.float64), "s": x.sum(1),
            "ss": x.transpose(1, 2) @ x}


def fad_from_stats(stats, members, ref):
    """-FAD of the pooled frames of the member examples (an index tensor) against the reference."""
    n, s, ss = stats["n"][members].sum(), stats["s"][members].sum(0), stats["ss"][members].sum(0)
    mu = s / n
    sigma = (ss - n * torch.outer(mu, mu)) / (n - 1)
    return -float(frechet_to_reference(mu[None], sigma[None], ref)[0])


def build_reward(cfg, codec, text_encoder, rank=0):
    """The reward named by config section `reward` (kind, encoder, reference)."""
    rc = cfg["reward"]
    kind = rc["kind"]
    if kind not in REWARD_TYPES:
        raise ValueError(f"reward.kind must be one of {sorted(REWARD_TYPES)}, got {kind!r}")
    needs_clap = kind in ("aesthetics", "clap_score") or rc["encoder"] == "clap"
    clap = load_or_fit_clap(cfg, text_encoder, rank) if needs_clap else None
    name = kind if kind in ("aesthetics", "clap_score") else f"{kind}[{rc['encoder']}" + (
        f",{rc['reference']}]" if kind != "vendi" else "]")

    if kind == "aesthetics":                                  # instance: r(x)
        windows = frame_features(codec, clap, "clap", name)
        identity = {"clap": clap.identity, "codec": LatentIdentity(cfg).identity, "aesthetics": cfg["aesthetics"],
                    "data": cfg["data"], "seed": cfg["seed"]}
        head = load_or_fit_aesthetics(cfg, identity, lambda audio: F.normalize(
            windows(codec.encode(audio)).mean(1), dim=-1), rank)
        return Reward(name, REWARD_TYPES[kind], windows,
                      score=lambda f, prompts=None: predict_aesthetics(head, F.normalize(f.mean(1), dim=-1)).float())
    if kind == "clap_score":                                  # instance-to-instance: r(x, c)
        windows = frame_features(codec, clap, "clap", name)

        def clap_score(f, prompts):
            return (F.normalize(f.mean(1), dim=-1) * clap.text_embedding(prompts)).sum(-1)
        return Reward(name, REWARD_TYPES[kind], windows, score=clap_score)

    frames = frame_features(codec, clap, rc["encoder"], name)
    if kind == "vendi":                                       # distribution, reference-free: r(S)
        return Reward(name, "distribution", lambda z, p=None: F.normalize(frames(z).mean(1), dim=-1),
                      set_scorer=lambda emb: lambda members: vendi_score(emb[members]))
    encoder = clap if rc["encoder"] == "clap" else LatentIdentity(cfg)
    ref = reference_stats(cfg, encoder, rc["reference"], lambda audio: frames(codec.encode(audio)), rank)
    if kind == "fad_per_song":                                # instance-to-distribution: r(x, R)
        return Reward(name, REWARD_TYPES[kind], frames, score=lambda f, prompts=None: per_song_fad(f, ref, name))

    def dataset_fad(features):                                # distribution: r(S, R) on pooled frames
        if features.shape[2] != ref["mu"].shape[0]:
            raise ValueError(f"reward {name}: embedding dimension {features.shape[2]} != reference "
                             f"{ref['mu'].shape[0]}")
        stats = set_stats(features)
        return lambda members: fad_from_stats(stats, members, ref)
    return Reward(name, "distribution", frames, set_scorer=dataset_fad)


class LatentIdentity:
    """Identity of the latent-frame encoder, for the reference cache's metadata."""

    def __init__(self, cfg):
        self.identity = {"kind": "latent", **{k: cfg["codec"][k] for k in sorted(cfg["codec"])},
                         "sample_rate": cfg["data"]["sample_rate"], "decode": "clipped at full scale"}
