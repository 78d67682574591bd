"""The listener: what a person would notice in a clip, read from the audio alone (it never sees the
reward models). Loudness and samples at full scale, audible clipping, hiss and dropouts, and
whether the melody's pitch register is the one the prompt asks for. pretrain.py, train.py and
eval.py report it next to every reward, so a reward gain bought by worse audio shows; eval.py
also runs the paper's paired listening test with it (preference).
"""
import torch

from data import attributes_from_prompt

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


def preference(report_a, report_b):
    """The listener's choice between clip a and clip b of the same prompt and noise, clip by clip
    (two listen() reports): +1 prefers a, -1 prefers b, 0 no preference (a tie, dropped as the
    paper drops ties). Audible defects decide first (fewer of clipping, hiss, dropout), then
    following the prompt (the register it names)."""
    def defects(r):
        return r["clipping"] + r["hiss"] + r["dropout"]
    pref = torch.sign(defects(report_b) - defects(report_a))
    if "register_match" in report_a:
        follows = torch.sign(report_a["register_match"].nan_to_num(0.0) - report_b["register_match"].nan_to_num(0.0))
        pref = torch.where(pref == 0, follows, pref)
    return pref
