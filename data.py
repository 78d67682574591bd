"""What the generator sees: music, captions, ratings, prompt and exemplar sets, WAV I/O.

Offline default: a synthetic music world, procedurally generated from a seed. Each clip is a short
melody with known attributes (instrument timbre, key and scale, tempo, register, note density,
percussion, dynamics), a caption built from those attributes in one of several phrasings, and
possibly audible defects (off-scale notes, detuning, hiss, clipping, timing jitter, dropouts)
that lower a 1-5 quality rating (the stand-in for the paper's DMA ratings). The same interfaces
serve real data: a folder of audio files with a captions file, prompt files, exemplar folders.
The codec and the text encoder are in encoders.py; reading a clip back from its audio in listen.py.
"""
import functools
import math
import os
import re
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
    """-> (float32 array [channels, samples] in [-1, 1], sample rate). Clear errors name the
    file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"audio file not found: {path}")
    try:
        sr, a = scipy.io.wavfile.read(path)
    except Exception as e:
        raise ValueError(f"audio file {path} could not be read as WAV: {e}") from e
    if a.dtype == np.uint8:                                  # 8-bit WAV is unsigned, centred at 128
        a = (a.astype(np.float32) - 128.0) / 128.0
    # 16/32-bit signed (scipy reads 24-bit as 32)
    elif np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float32) / float(-np.iinfo(a.dtype).min)
    a = np.asarray(a, dtype=np.float32)
    # float WAV beyond full scale: kept, not rescaled
    if np.abs(a).max(initial=0.0) > 1.0:
        warnings.warn(f"audio file {path} peaks at {np.abs(a).max():.2f}, beyond full scale "
                      f"[-1, 1]; it is used as it is (scale the file to change that)")
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
    "a {dynamics} {density} piece for {instrument} {percussion}, {tempo}, {register}, in {key} "
    "{scale}",
    "{register} {instrument} playing a {scale} tune in {key}, {tempo} and {dynamics}, {density}, "
    "{percussion}",
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


def attributes_from_prompt(prompt):
    """The attribute values a prompt names (phrases matched as whole words), e.g.
    {'register': 'low'}."""
    found = {}
    for attr, values in ATTRIBUTES.items():
        for value, phrases in values.items():
            if any(re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", prompt) for p in phrases):
                found.setdefault(attr, value)
    return found


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
    """(frequency ratio, amplitude) of an instrument's partials, and its envelope (attack s,
    decay s)."""
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
        phase_mod = phase_mod * 2 ** (detune_depth
                                      * np.sin(2 * np.pi * 3.0 * t + rng.uniform(0, 6.3)) / 12)
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
    kick = (np.sin(2 * np.pi * (50 * k + 60 * (1 - np.exp(-k / 0.03)) * 0.03 * 30))
            * np.exp(-k / 0.05))
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


def render_clip(attrs, defects, sr, seconds, rng, noise_floor=0.0):
    """Audio [samples] of one clip with the given attributes and defects (severities in [0, 1]),
    recorded over a noise floor of RMS `noise_floor` (room and microphone noise: real recordings are
    never digitally silent, so a dropout, which cuts the noise too, is heard as a hole)."""
    n = int(sr * seconds)
    bpm = TEMPO_BPM[attrs["tempo"]]
    note_len = 60.0 / bpm / NOTES_PER_BEAT[attrs["density"]]
    n_notes = int(math.ceil(seconds / note_len))
    steps = SCALE_STEPS[attrs["scale"]]
    # stay inside the register
    tonic = REGISTER_MIDI[attrs["register"]] + KEYS.index(attrs["key"]) % 6
    degree = int(rng.integers(0, 5))
    onsets = np.arange(n_notes) * note_len
    if "jitter" in defects:                                 # defect: sloppy timing
        onsets = onsets + (rng.normal(0, 0.06 * defects["jitter"], n_notes)
                           * (np.arange(n_notes) > 0))
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
        audio[start:start + length] += render_note(440.0 * 2 ** ((midi - 69) / 12), length, sr,
                                                   attrs["instrument"],
                                                   0.8 * defects.get("detune", 0.0), rng)
    audio *= LOUDNESS[attrs["dynamics"]]
    if attrs["percussion"] == "drums":
        audio += LOUDNESS[attrs["dynamics"]] * render_drums(n, sr, bpm, rng)
    if noise_floor:
        audio += noise_floor * rng.standard_normal(n)
    if "dropout" in defects:                                # defect: the signal cuts out
        for _ in range(int(rng.integers(1, 3))):
            gap = min(int(sr * 0.25 * defects["dropout"]), n // 2)
            s = int(rng.integers(0, n - gap))
            audio[s:s + gap] = 0.0
    if "hiss" in defects:                                   # defect: broadband noise
        audio += 0.08 * defects["hiss"] * rng.standard_normal(n)
    if "clipping" in defects:                               # defect: overdriven and hard-clipped
        limit = 0.3 * LOUDNESS[attrs["dynamics"]] / (1 + 3 * defects["clipping"])
        audio = (np.clip(audio * (1 + 4 * defects["clipping"]), -limit, limit) / limit
                 * LOUDNESS[attrs["dynamics"]])
    return np.clip(audio, -1, 1).astype(np.float32)


@dataclass
class Corpus:
    """A set of clips: audio [N, samples] (float32 tensor) and, per clip, caption, rating
    (NaN when unrated), attributes and defects (synthetic data) or source file (real data)."""
    audio: torch.Tensor
    captions: list
    ratings: torch.Tensor
    attributes: list = field(default_factory=list)
    defects: list = field(default_factory=list)
    # real data: the audio file each window was cut from
    files: list = field(default_factory=list)

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


def synthetic_corpus(split, n, sr, seconds, seed, p_defect=0.5, rated_fraction=1.0, restrict=None,
                     noise_floor=0.0, first=0):
    """Clips first .. first + n - 1 of a split; clip i depends only on (seed, split, i)."""
    audio, captions, ratings, attributes, defects = [], [], [], [], []
    for i in range(first, first + n):
        attrs, d, caption, r, rng = clip_spec(split, i, seed, p_defect, restrict)
        captions.append(caption)
        ratings.append(r if rng.random() < rated_fraction else float("nan"))
        audio.append(render_clip(attrs, d, sr, seconds, rng, noise_floor))
        attributes.append(attrs)
        defects.append(d)
    return Corpus(torch.from_numpy(np.stack(audio)), captions,
                  torch.tensor(ratings, dtype=torch.float32), attributes, defects)


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
    """(line number, text) of the entries of a list file: blank lines and '#' comments are skipped,
    but the numbers are the file's own, so an error points at the right line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [(i, ln.rstrip("\r\n")) for i, ln in enumerate(f, 1)]
    lines = [(i, ln) for i, ln in lines if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {path} has no entries")
    return lines


def list_fingerprint(path):
    """What a list file's contents depend on: its own text and the size and modification time of
    every file it names (first tab-separated column, relative to the list file), so caches keyed by
    it notice an edited list or a replaced audio file."""
    root = os.path.dirname(os.path.abspath(path))
    entries = []
    for _, line in read_lines(path, "list"):
        target = os.path.join(root, line.split("\t")[0])
        st = os.stat(target) if os.path.isfile(target) else None
        entries.append([line, st.st_size if st else None, st.st_mtime_ns if st else None])
    return entries


def rated_files(captions_file):
    """How many files of a captions file have a rating (a third, numeric column), read without
    audio."""
    rated = 0
    for lineno, line in read_lines(captions_file, "captions"):
        cols = line.split("\t")
        if len(cols) == 3:
            try:
                float(cols[2])
            except ValueError:
                raise ValueError(f"{captions_file}:{lineno}: rating '{cols[2]}' is not a "
                                 "number") from None
            rated += 1
    return rated


def read_prompts(path):
    """One prompt per line."""
    return [p.strip() for _, p in read_lines(path, "prompt")]


def folder_corpus(captions_file, sr, seconds, mono=True, allow_resample=True, lines=slice(None)):
    """Clips listed in a captions file, one line per clip: `path<TAB>caption[<TAB>rating]`
    (paths relative to the captions file; `lines`: a slice of its entries). Long clips are cut into
    non-overlapping windows of `seconds`; a clip shorter than one window is an error, never a silent
    skip."""
    root = os.path.dirname(os.path.abspath(captions_file))
    window = int(sr * seconds)
    audio, captions, ratings, files = [], [], [], []
    for lineno, line in read_lines(captions_file, "captions")[lines]:
        cols = line.split("\t")
        where = f"{captions_file}:{lineno}"
        if len(cols) not in (2, 3):
            raise ValueError(f"{where}: expected 'path<TAB>caption[<TAB>rating]', got {len(cols)} "
                             "columns")
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
            raise ValueError(f"{where}: {cols[0]} is {a.shape[1] / sr:.2f} s long, shorter than "
                             f"one {seconds} s training window")
        for start in range(0, a.shape[1] - window + 1, window):
            audio.append(a[:, start:start + window])
            captions.append(cols[1].strip())
            ratings.append(rating)
            files.append(cols[0])
    a = torch.from_numpy(np.stack(audio))
    return Corpus(a[:, 0] if mono else a, captions, torch.tensor(ratings, dtype=torch.float32),
                  files=files)


def synthetic_args(data_cfg, split, n=None, restrict=None, p_defect=None):
    """synthetic_corpus's arguments for a split of config section data (n clips, default
    n_<split>)."""
    return (split, n if n is not None else data_cfg[f"n_{split}"], data_cfg["sample_rate"],
            data_cfg["clip_seconds"], data_cfg["seed"],
            data_cfg["p_defect"] if p_defect is None else p_defect,
            data_cfg["rated_fraction"] if split == "train" else 1.0, restrict,
            data_cfg["noise_floor"])


def load_corpus(data_cfg, split, n=None, restrict=None, p_defect=None):
    """The corpus of a split from config: synthetic (generated) or folder (captions file per split).
    The synthetic training split is rendered once per process (pre-training, the CLAP and the
    aesthetics head all read it in train.py); callers must not modify it."""
    if data_cfg["source"] == "synthetic":
        args = synthetic_args(data_cfg, split, n, restrict, p_defect)
        return (cached_corpus(*args) if split == "train" and restrict is None
                else synthetic_corpus(*args))
    if data_cfg["source"] == "folder":
        path = data_cfg[f"{split}_captions"]
        if not path:
            raise ValueError(f"data.{split}_captions must name a captions file when "
                             "data.source=folder")
        return folder_corpus(path, data_cfg["sample_rate"], data_cfg["clip_seconds"], True,
                             data_cfg["resample"])
    raise ValueError(f"data.source must be 'synthetic' or 'folder', got {data_cfg['source']!r}")


def corpus_chunks(data_cfg, split, size):
    """The corpus of a split in chunks of about `size` clips (of `size` files for a folder corpus),
    so a corpus larger than memory can be encoded piece by piece."""
    if data_cfg["source"] == "synthetic":
        n = data_cfg[f"n_{split}"]
        for first in range(0, n, size):
            yield synthetic_corpus(*synthetic_args(data_cfg, split, min(size, n - first)), first)
        return
    path = data_cfg[f"{split}_captions"]
    if not path:
        raise ValueError(f"data.{split}_captions must name a captions file when data.source=folder")
    for first in range(0, len(read_lines(path, "captions")), size):
        yield folder_corpus(path, data_cfg["sample_rate"], data_cfg["clip_seconds"], True,
                            data_cfg["resample"], slice(first, first + size))


def cycled(prompts, n):
    """n prompts from a set, cycled when the set is smaller (callers give each repeat its own noise
    seed)."""
    return [prompts[i % len(prompts)] for i in range(n)]


def prompt_set(data_cfg, name):
    """Prompts without audio: 'train' (the training captions, DRAGON's prompts), 'heldout' (captions
    of test clips, the ALIM-test analogue) or 'user' (freely worded, the DMA analogue); from the
    captions and prompt files when data.source=folder."""
    if name == "train" and data_cfg["source"] == "folder":
        path = data_cfg["train_captions"]
        if not path:
            raise ValueError("data.train_captions must name a captions file when "
                             "data.source=folder")
        rows = [(lineno, line.split("\t")) for lineno, line in read_lines(path, "captions")]
        for lineno, cols in rows:
            if len(cols) not in (2, 3) or not cols[1].strip():
                raise ValueError(f"{path}:{lineno}: expected 'path<TAB>caption[<TAB>rating]' with "
                                 "a caption")
        # one prompt per line, audio not loaded
        return [cols[1].strip() for _, cols in rows]
    if name == "train":
        return [clip_spec("train", i, data_cfg["seed"], data_cfg["p_defect"])[2]
                for i in range(data_cfg["n_train"])]
    if data_cfg["source"] == "folder":
        path = data_cfg[f"{name}_prompts"]
        if not path:
            raise ValueError(f"data.{name}_prompts must name a prompt file when data.source=folder")
        return read_prompts(path)
    if name == "heldout":
        return [clip_spec("test", i, data_cfg["seed"], data_cfg["p_defect"])[2]
                for i in range(data_cfg["n_test"])]
    if name == "user":
        return user_prompts(data_cfg["n_test"], data_cfg["seed"])[0]
    raise ValueError(f"unknown prompt set {name!r}: expected 'train', 'heldout' or 'user'")


def check_finite(x, where, items="clips", error=ValueError):
    """Reject NaN/inf values with a message that names the caller and the offending items
    (dim 0)."""
    x = torch.as_tensor(x)
    bad = ~torch.isfinite(x.flatten(1) if x.dim() > 1 else x[:, None]).all(dim=1)
    if bad.any():
        raise error(f"{where}: {items} {bad.nonzero().flatten().tolist()} contain NaN or infinite "
                    "values")
