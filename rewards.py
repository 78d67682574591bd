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
  clap    CLAP window embeddings (clap.py): offline, a small audio-text model fitted here on the
          training corpus (SmallClap); at real scale, transformers' ClapModel from a folder or hub
          name.

Adding a reward is one builder and one row of REWARDS (at the end of this file). The cosine of a
clip's mean embedding to an exemplar set's mean (tests/test_rewards.py checks it by hand):

    def cosine_exemplar_reward(cfg, codec, clap, frames, ref, name, rank):
        mu = ref["mu"].float()          # frames: per-clip features [B, n, d]; ref: (mu, sigma)
        return {"score": lambda f, prompts=None: F.cosine_similarity(f.mean(1), mu[None], dim=-1)}
        # a set reward returns {"set_scorer": lambda f: lambda members: r(S) of f[members]}

    REWARDS["cosine_exemplar"] = ("instance-to-distribution", None, True, cosine_exemplar_reward)

then `reward.kind=cosine_exemplar reward.encoder=clap reward.reference=text:alim` trains on it
and `eval.rewards=[..., cosine_exemplar/clap/text:alim]` evaluates it.
"""
import copy
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clap import clap_check_split, load_or_fit_clap, reward_dir
from data import EXEMPLAR_RESTRICT, check_finite, folder_corpus, list_fingerprint, load_corpus
from data import rated_files, read_prompts, resample
from model import load_or_fit

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
    matrix, so eigh applies and the result stays real for rank-deficient covariances. The
    reference form of the two-set FAD; the rewards use frechet_to_reference, which reuses the
    reference's cached square root."""
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
    """mean and unbiased covariance of frames [N, d] (float64), with the covariance's
    square root."""
    x = _f64(frames)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 frames for a covariance, got {x.shape[0]}")
    mu = x.mean(0)
    sigma = (x - mu).T @ (x - mu) / (x.shape[0] - 1)
    return {"mu": mu, "sigma": sigma, "sigma_sqrt": sqrtm_psd(sigma)}


def vendi_score(embeddings):
    """Vendi (q = 1): exp(-sum lambda log lambda), lambda = eig(K / n), K the cosine kernel of the
    L2-normalised embeddings [n, d]; embeddings [S, n, d]: the S sets' scores [S], one batched
    eigendecomposition."""
    x = F.normalize(_f64(embeddings), dim=-1)
    lam = torch.linalg.eigvalsh(x @ x.transpose(-1, -2) / x.shape[-2]).clamp(min=0)
    entropy = -torch.where(lam > 1e-12, lam * lam.log(), 0.0).sum(-1)
    return float(entropy.exp()) if x.dim() == 2 else entropy.exp()


# =============================================================================================
# The aesthetics predictor: frozen CLAP audio embedding -> kernel ridge regression (paper)
# =============================================================================================

VAL_FRACTION = 0.15     # paper: an 85/15 split of the rated clips for validation
RIDGE = 0.1             # kernel ridge regulariser on z-scored ratings


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

    # rated files (real data) or clips (synthetic), at least 20
    def rated_units(rated, what):
        unit = [corpus.files[i] for i in rated.tolist()] if corpus.files else rated.tolist()
        if len(set(unit)) < 20:
            how = ("add a 1-5 rating as a third tab-separated column to the lines of "
                   "data.train_captions"
                   if corpus.files else "raise data.rated_fraction or data.n_train")
            raise ValueError(f"aesthetics: only {len(set(unit))} {what} training "
                             f"{'files' if corpus.files else 'clips'}; need at least 20: {how}")
        return unit
    rated_units(rated, "rated")
    rated = rated[audible(corpus.audio[rated], "aesthetics: rated training clips")]
    unit = rated_units(rated, "rated, audible")
    X = torch.cat([embed_audio(corpus.audio[rated[i:i + 128]]) for i in range(0, len(rated), 128)])
    y = corpus.ratings[rated].double()
    mean, std = float(y.mean()), float(y.std())
    y = (y - mean) / std
    g = torch.Generator().manual_seed(cfg["seed"])
    # real data: all windows of a file fall on the same side of the split
    if corpus.files:
        files = sorted(set(unit))
        held = {files[k] for k in torch.randperm(len(files), generator=g)[
                    : max(1, round(VAL_FRACTION * len(files)))].tolist()}
        is_val = torch.tensor([u in held for u in unit])
        val, tr = is_val.nonzero().flatten(), (~is_val).nonzero().flatten()
    else:
        perm = torch.randperm(len(rated), generator=g)
        n_val = int(round(VAL_FRACTION * len(rated)))
        val, tr = perm[:n_val], perm[n_val:]
    groups = [f"{corpus.attributes[i]['instrument']}-{corpus.attributes[i]['register']}"
              if corpus.attributes else corpus.captions[i] for i in rated.tolist()]
    best = None
    for ls in ac["lengthscales"]:
        alpha = fit_kernel_ridge(X[tr], y[tr], ls, RIDGE)
        pred = rbf_kernel(X[val], X[tr], ls) @ alpha
        plcc = float(np.corrcoef(pred.numpy(), y[val].numpy())[0, 1])
        # an undefined PLCC never wins
        if best is None or (np.isfinite(plcc) and not plcc <= best[1]):
            srcc = per_group_srcc(pred.numpy(), y[val].numpy(), [groups[i] for i in val.tolist()])
            best = (ls, plcc, srcc)
    ls, plcc, srcc = best
    if not np.isfinite(plcc):
        raise ValueError(f"aesthetics: the validation PLCC is undefined on {len(val)} held-out "
                         f"clips (their ratings or predictions are constant); rate more files, "
                         f"with different ratings")
    alpha = fit_kernel_ridge(X, y, ls, RIDGE)             # refit on all rated clips
    return {"X": X, "alpha": alpha, "lengthscale": ls, "mean": mean, "std": std,
            "report": {"plcc": plcc, "srcc_per_prompt": srcc, "n_train": len(tr), "n_val": len(val),
                       "lengthscale": ls}}


def load_or_fit_aesthetics(cfg, identity, embed_audio, rank=0):
    """The fitted head from out_dir/rewards/aesthetics.pt when it was fitted with this encoder
    (identity), else fit it now and save it."""
    path = os.path.join(reward_dir(cfg), "aesthetics.pt")

    def fit():
        t0 = time.time()
        head = fit_aesthetics(cfg, embed_audio)
        r = head["report"]
        if rank == 0:
            tqdm.write(f"aesthetics predictor fitted in {time.time() - t0:.0f}s: validation PLCC "
                       f"{r['plcc']:.3f}, per-prompt SRCC {r['srcc_per_prompt']:.3f} "
                       f"({r['n_val']} held-out clips); saved to {path}")
        return head
    return load_or_fit(path, identity, fit, rank)


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
    kind, _, name = reference.partition(":")                  # checked by check_reward_inputs
    n = cfg["reward"]["n_reference"]
    if name in EXEMPLAR_RESTRICT and not os.path.isfile(name):
        corpus = load_corpus(cfg["data"], f"exemplar_{name}", n=n, restrict=EXEMPLAR_RESTRICT[name],
                             p_defect=0.0)
        return kind, corpus if kind == "audio" else corpus.captions
    if kind == "text":
        return kind, read_prompts(name)
    d = cfg["data"]
    return kind, folder_corpus(name, d["sample_rate"], d["clip_seconds"], True, d["resample"])


def reference_stats(cfg, encoder, reference, embed_audio, rank=0):
    """Gaussian statistics of the reference set's embeddings: audio references give frame
    embeddings, text references one CLAP text embedding per caption. Cached in out_dir/rewards
    with metadata (encoder, data section, count; for a file reference its lines and the
    size and modification time of every file it lists); reused only when that matches."""
    # the data section makes the synthetic exemplars (seed, noise floor, clip length, ...)
    meta = {"reference": reference, "encoder": encoder.identity,
            "n_reference": cfg["reward"]["n_reference"], "data": cfg["data"]}
    if cfg["reward"]["level_rms"]:
        meta["level_rms"] = cfg["reward"]["level_rms"]
    name = reference.partition(":")[2]
    # a file reference: keyed by its content and its files
    if os.path.isfile(name):
        meta["files"] = list_fingerprint(name)
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    # one per encoder: mel, small, ...
    stem = f"{encoder.identity['kind']}_{reference.replace(':', '_').replace('/', '_')}"
    path = os.path.join(reward_dir(cfg), f"ref_{stem}.pt")
    return load_or_fit(path, key, lambda: reference_fit(cfg, encoder, reference, embed_audio, meta),
                       rank)["stats"]


def reference_fit(cfg, encoder, reference, embed_audio, meta):
    kind, items = reference_items(cfg, reference)
    if len(items) == 0:
        raise ValueError(f"reward.reference={reference}: the exemplar set is empty")
    if kind == "text":
        frames = encoder.text_embedding(items)
    else:
        audio = items.audio[audible(items.audio, f"reward.reference={reference}")]
        chunks = [embed_audio(audio[i:i + 128]) for i in range(0, len(audio), 128)]
        frames = torch.cat([c.flatten(0, 1) for c in chunks])
    stats = gaussian_stats(frames)
    stats["count"] = len(frames) if kind == "text" else len(audio)
    return {"meta": meta, "stats": stats}


# =============================================================================================
# One interface for train.py and eval.py
# =============================================================================================

@dataclass
class Scores:
    """A reward's verdict on a batch of demonstrations. per_example [B]: r of each clip (instance
    types; None for set types). of(members) -> r(S) of the members (an index tensor into the
    batch): the mean of per_example for instance types, the set reward itself for distribution
    types, so "the reward of D+" means one thing for every type; of(members [K, m]) -> the K
    sets' rewards [K] in one batched call."""
    per_example: object
    of: object


@dataclass
class Reward:
    """features(latents, prompts[, audio]) -> per-example features, computed once per batch (the
    decode / encode of Appendix F step 4; audio, when given, is codec.decode(latents), so a caller
    that also listens decodes once); scores(features, prompts) -> Scores (step 5).
    Instance types give score(features, prompts) -> [B]; set types give set_scorer(features) ->
    r(members), cheap to call many times (dataset FAD sums per-example statistics once, so a swap
    costs one d x d eigendecomposition)."""
    name: str
    type: str
    # whose frames features() returns: clap | latent (equal encoders, equal features)
    encoder: str
    features: object
    score: object = None
    set_scorer: object = None

    @property
    def is_set(self):
        return self.type == "distribution"

    def scores(self, features, prompts):
        if self.is_set:
            r = self.set_scorer(features)
            check_finite(torch.tensor([r(torch.arange(len(features)))]),
                         f"reward {self.name} (a run keeps its last good checkpoint)", "sets",
                         FloatingPointError)
            return Scores(None, r)
        values = self.score(features, prompts).double()
        check_finite(values, f"reward {self.name} (a run keeps its last good checkpoint)",
                     "examples", FloatingPointError)
        def of(members):
            r = values[members].mean(-1)
            return r.item() if members.dim() == 1 else r
        return Scores(values, of)

    def set_score(self, features, prompts=None):
        """r of the whole batch (the mean over clips for instance types)."""
        return self.scores(features, prompts).of(torch.arange(len(features)))


def frame_features(codec, clap, encoder_name, reward_name, level_rms=0.0):
    """The per-clip frame embeddings [B, frames, d] of the chosen encoder, from latents. With
    level_rms > 0 (reward.level_rms) each clip is first scaled to that RMS, so the reward cannot
    prefer a louder clip."""
    if encoder_name == "latent":
        def features(latents, prompts=None, audio=None):
            check_finite(latents, f"reward {reward_name}", "examples")
            if level_rms > 0:
                audio = codec.decode(latents) if audio is None else audio
                latents = codec.encode(level_normalised(audio, level_rms))
            return latents.float().transpose(1, 2)           # one embedding per latent frame
        return features
    if encoder_name == "clap":
        # audio: codec.decode(latents), when the caller has it
        def features(latents, prompts=None, audio=None):
            check_finite(latents, f"reward {reward_name}", "examples")
            audio = codec.decode(latents) if audio is None else audio
            check_audible(audio, reward_name)
            audio = level_normalised(audio, level_rms)
            return clap.window_embeddings(resample_for(audio, codec.sample_rate, clap.sample_rate))
        return features
    raise ValueError(f"reward.encoder must be 'latent' or 'clap', got {encoder_name!r}")


def level_normalised(audio, rms):
    """Clips [B, samples] each scaled to RMS `rms`, as loudness-normalised audio metrics compare
    clips; rms = 0 leaves them as they are."""
    if rms <= 0:
        return audio
    return audio * (rms / audio.pow(2).mean(1, keepdim=True).sqrt().clamp_min(SILENT))


def resample_for(audio, sr_from, sr_to):
    return audio if sr_from == sr_to else torch.from_numpy(resample(audio.numpy(), sr_from, sr_to))


SILENT = 1e-5          # peak below which a clip is silence


def check_audible(audio, name):
    check_finite(audio, f"reward {name}")
    silent = audio.abs().amax(dim=1) < SILENT
    if silent.any():
        raise ValueError(f"reward {name}: clips {silent.nonzero().flatten().tolist()} are silent")


def audible(audio, what, peak=1e-3):
    """Mask of the clips [N, samples] whose peak reaches -60 dBFS. Real songs have silent windows
    (before the first note, after the last): they are left out of reference sets and rated clips,
    with a warning (quieter windows can fall under SILENT after the codec round trip)."""
    keep = audio.abs().amax(dim=1) >= peak
    if not keep.any():
        raise ValueError(f"{what}: all {len(audio)} clips are silent")
    if not keep.all():
        warnings.warn(f"{what}: left out {int((~keep).sum())} silent clips of {len(audio)}")
    return keep


def per_song_fad(frames, ref, name="fad_per_song"):
    """-FAD of each clip's frames [B, n, d] against reference statistics, batched."""
    if frames.shape[1] < 2:
        raise ValueError(f"reward {name}: per-song FAD needs at least 2 frames per clip, got "
                         f"{frames.shape[1]}")
    if frames.shape[2] != ref["mu"].shape[0]:
        raise ValueError(f"reward {name}: embeddings have dimension {frames.shape[2]} but the "
                         f"reference statistics have {ref['mu'].shape[0]}; the cache was made "
                         f"with another encoder")
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
    """-FAD of the pooled frames of the member examples (an index tensor [m]) against the
    reference; members [S, m]: the S sets' -FAD [S], one batched eigendecomposition."""
    sets = members.reshape(-1, members.shape[-1])
    # [S, B]: how often each example is in each set, so the pooled sums are one matrix product
    w = torch.zeros(len(sets), len(stats["n"]), dtype=torch.float64).scatter_add_(
        1, sets, torch.ones(sets.shape, dtype=torch.float64))
    n, s = w @ stats["n"], w @ stats["s"]
    ss = (w @ stats["ss"].flatten(1)).view(-1, *stats["ss"].shape[1:])
    mu = s / n[:, None]
    sigma = (ss - n[:, None, None] * mu[:, :, None] * mu[:, None, :]) / (n - 1)[:, None, None]
    fad = frechet_to_reference(mu, sigma, ref)
    return -float(fad[0]) if members.dim() == 1 else -fad


# One table: each reward kind, its paper type, the encoder it uses (None: reward.encoder) and
# whether it is scored against a reference set. Adding a reward is a builder below and one row.
def aesthetics_reward(cfg, codec, clap, frames, ref, name, rank):       # instance: r(x)
    identity = {"clap": clap.identity, "codec": LatentIdentity(cfg).identity,
                "aesthetics": cfg["aesthetics"], "data": cfg["data"], "seed": cfg["seed"]}
    if cfg["reward"]["level_rms"]:
        identity["level_rms"] = cfg["reward"]["level_rms"]

    def embed(audio):
        return F.normalize(frames(codec.encode(audio)).mean(1), dim=-1)
    head = load_or_fit_aesthetics(cfg, identity, embed, rank)
    def score(f, prompts=None):
        return predict_aesthetics(head, F.normalize(f.mean(1), dim=-1)).float()
    return {"score": score}


# instance-to-instance: r(x, c)
def clap_score_reward(cfg, codec, clap, frames, ref, name, rank):
    def score(f, prompts):
        return (F.normalize(f.mean(1), dim=-1) * clap.text_embedding(prompts)).sum(-1)
    return {"score": score}


# instance-to-distribution: r(x, R)
def fad_per_song_reward(cfg, codec, clap, frames, ref, name, rank):
    return {"score": lambda f, prompts=None: per_song_fad(f, ref, name)}


# distribution: r(S, R), pooled frames
def fad_dataset_reward(cfg, codec, clap, frames, ref, name, rank):
    def dataset_fad(features):
        if features.shape[2] != ref["mu"].shape[0]:
            raise ValueError(f"reward {name}: embedding dimension {features.shape[2]} != reference "
                             f"{ref['mu'].shape[0]}")
        stats = set_stats(features)
        return lambda members: fad_from_stats(stats, members, ref)
    return {"set_scorer": dataset_fad}


# distribution, reference-free: r(S)
def vendi_reward(cfg, codec, clap, frames, ref, name, rank):
    def vendi(features):
        emb = F.normalize(features.mean(1), dim=-1)
        return lambda members: vendi_score(emb[members])
    return {"set_scorer": vendi}


# kind: (paper's type, encoder or None for reward.encoder, uses reward.reference, builder)
REWARDS = {
    "aesthetics": ("instance", "clap", False, aesthetics_reward),
    "clap_score": ("instance-to-instance", "clap", False, clap_score_reward),
    "fad_per_song": ("instance-to-distribution", None, True, fad_per_song_reward),
    "fad_dataset": ("distribution", None, True, fad_dataset_reward),
    "vendi": ("distribution", None, False, vendi_reward),
}


def reward_name(rc):
    """How config section `reward` appears in logs and tables: kind, kind[encoder] or
    kind[encoder,reference]."""
    if rc["kind"] not in REWARDS:
        raise ValueError(f"reward.kind must be one of {sorted(REWARDS)}, got {rc['kind']!r}")
    _, fixed_encoder, uses_reference, _ = REWARDS[rc["kind"]]
    if fixed_encoder:
        return rc["kind"]
    return f"{rc['kind']}[{rc['encoder']}" + (f",{rc['reference']}]" if uses_reference else "]")


def parse_reward(spec):
    """A reward spec of eval.rewards, 'kind', 'kind/encoder' or 'kind/encoder/reference', -> keys of
    config section reward. The reference is everything after the second '/', so it may be a path:
    fad_per_song/latent/audio:/data/ref.tsv."""
    parts = spec.split("/", 2)
    if parts[0] not in REWARDS:
        raise ValueError(f"reward spec {spec!r}: kind must be one of {sorted(REWARDS)}")
    return dict(zip(["kind", "encoder", "reference"], parts))


def check_reward_inputs(cfg):
    """What a reward needs from the data, checked before any model is fitted, each failure with
    what to do: ratings for aesthetics, held-out clips for the offline CLAP's check, an exemplar
    set that exists, fits the data source and the encoder, and has an audible clip."""
    rc, d = cfg["reward"], cfg["data"]
    _, fixed_encoder, uses_reference, _ = REWARDS[rc["kind"]]
    encoder = fixed_encoder or rc["encoder"]
    if encoder not in ("clap", "latent"):
        raise ValueError(f"reward.encoder must be 'latent' or 'clap', got {encoder!r}")
    if rc["level_rms"] < 0:
        raise ValueError(f"reward.level_rms must be >= 0 (0 = clips as generated), got "
                         f"{rc['level_rms']}")
    folder = d["source"] == "folder"
    if encoder == "clap" and cfg["clap"]["kind"] == "small":
        clap_check_split(d)                     # held-out files for the offline CLAP's check
    if rc["kind"] == "aesthetics" and folder:
        rated = rated_files(d["train_captions"])
        if rated < 20:
            raise ValueError(f"reward.kind=aesthetics needs 1-5 ratings of at least 20 training "
                             f"files, but {d['train_captions']} rates {rated}: add a rating as a "
                             f"third tab-separated column (path<TAB>caption<TAB>rating), or use a "
                             f"reward that needs none: clap_score, fad_per_song, fad_dataset or "
                             f"vendi")
    if not uses_reference:
        return
    kind, _, name = rc["reference"].partition(":")
    if kind not in ("audio", "text") or not name:
        raise ValueError(f"reward.reference must be 'audio:NAME' or 'text:NAME', got "
                         f"{rc['reference']!r}")
    if kind == "text" and encoder != "clap":
        raise ValueError(f"reward.reference={rc['reference']}: text exemplars need a cross-modal "
                         f"encoder (reward.encoder=clap), not '{encoder}'")
    if name in EXEMPLAR_RESTRICT and not os.path.isfile(name):
        if folder:
            raise ValueError(f"reward.reference={rc['reference']!r} names a synthetic exemplar "
                             f"set, but data.source='folder': give audio:FILE.tsv or text:FILE.txt "
                             f"(for eval.py: the references in eval.rewards)")
        return
    # the exemplar clips exist, are long enough and not all silent
    if kind == "audio":
        items = folder_corpus(name, d["sample_rate"], d["clip_seconds"], True, d["resample"])
        audible(items.audio, f"reward.reference={rc['reference']}")
    else:
        read_prompts(name)


def build_reward(cfg, codec, rank=0):
    """The reward named by config section `reward` (kind, encoder, reference)."""
    rc = cfg["reward"]
    name = reward_name(rc)
    check_reward_inputs(cfg)
    paper_type, fixed_encoder, uses_reference, builder = REWARDS[rc["kind"]]
    encoder_name = fixed_encoder or rc["encoder"]
    clap = load_or_fit_clap(cfg, rank, codec.device) if encoder_name == "clap" else None
    frames = frame_features(codec, clap, encoder_name, name, rc["level_rms"])
    ref = None
    if uses_reference:
        encoder = clap if encoder_name == "clap" else LatentIdentity(cfg)
        ref = reference_stats(cfg, encoder, rc["reference"],
                              lambda audio: frames(codec.encode(audio)), rank)
    return Reward(name, paper_type, encoder_name, frames,
                  **builder(cfg, codec, clap, frames, ref, name, rank))


def build_reward_from_spec(cfg, spec, codec, rank=0):
    """The reward named by a spec of eval.rewards (parse_reward); the rest of section reward as in
    cfg."""
    c = copy.deepcopy(cfg)
    c["reward"].update(parse_reward(spec))
    return build_reward(c, codec, rank)


class LatentIdentity:
    """Identity of the latent-frame encoder, for the reference cache's metadata."""

    def __init__(self, cfg):
        self.identity = {"kind": "latent", **{k: cfg["codec"][k] for k in sorted(cfg["codec"])},
                         "sample_rate": cfg["data"]["sample_rate"],
                         "decode": "clipped at full scale"}
