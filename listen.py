"""The listener: what a person would notice in a clip, read from the audio alone (it never sees the
reward models). Loudness and samples at full scale, audible clipping, hiss and dropouts, and
whether the clip follows the prompt where the audio tells reliably: the melody's pitch register
and the dynamics (soft / loud). pretrain.py, train.py and eval.py report it next to every reward, so
a reward gain bought by worse audio shows; eval.py and benchmark.py also run the paper's paired
listening test with it (preference); validate measures how well it hears corpus clips whose
attributes and defects are known.
"""
import scipy.stats
import torch

from data import attributes_from_prompt, load_corpus

REGISTER_EDGES_HZ = (212.0, 600.0)   # between the median melody pitches of low / mid / high
LOUD_PEAK = 0.25                     # 99th-percentile |sample| between soft (peaks 0.1-0.26) and
                                     # loud (0.3-0.6) clips
HEARD_DEFECTS = ("clipping", "hiss", "dropout")   # the defects listen() reports per clip
READABLE = ("register", "dynamics")  # prompt attributes the listener reads back
                                     # (validate_on_corpus: 99% and 92-98%); tempo, drums and
                                     # instrument it does not (low melodies mask the kick drum)


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
    return [names[int(f > REGISTER_EDGES_HZ[0]) + int(f > REGISTER_EDGES_HZ[1])]
            for f in melody_pitch(audio, sr).tolist()]


def dynamics_of(audio):
    """'soft' / 'loud' from the 99th percentile of |sample| of each clip (a peak level, so sparse
    and dense melodies of the same dynamics read alike)."""
    peak = torch.as_tensor(audio).float().abs().quantile(0.99, dim=1)
    return ["loud" if p > LOUD_PEAK else "soft" for p in peak.tolist()]


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
    floor = (spec[:, freqs > 4000].sum(dim=1)
             / total.mean(dim=1, keepdim=True)).quantile(0.2, dim=1)
    quiet = (total / total.max(dim=1, keepdim=True).values)[:, 2:-2] < 1e-4
    run, longest = torch.zeros(len(quiet)), torch.zeros(len(quiet))
    # longest quiet run
    for t in range(quiet.shape[1]):
        run = (run + 1) * quiet[:, t]
        longest = torch.maximum(longest, run)
    return [{name for name, hit in (("hiss", f > 1e-2), ("dropout", n >= gap_frames)) if hit}
            for f, n in zip(floor.tolist(), longest.tolist())]


def listen(audio, sr, prompts=None):
    """What a listener would notice, read from the audio alone, per clip [B]: loudness (RMS), the
    fraction of samples at or beyond full scale (clipped when written as PCM), audible clipping
    (over 1% of the samples at full scale), hiss and dropouts (detect_defects), and, for prompts
    that name a register or dynamics, whether the measured one matches (1.0 / 0.0; NaN where the
    prompt names none)."""
    audio = torch.as_tensor(audio).float()
    defects = detect_defects(audio, sr)
    full_scale = (audio.abs() >= 1.0).float().mean(1)
    report = {"rms": audio.pow(2).mean(1).sqrt(), "full_scale": full_scale,
              "clipping": (full_scale > 0.01).float(),
              "hiss": torch.tensor([float("hiss" in d) for d in defects]),
              "dropout": torch.tensor([float("dropout" in d) for d in defects])}
    if prompts is not None:
        asked = [attributes_from_prompt(p) for p in prompts]
        for attr, heard in (("register", register_of(audio, sr)), ("dynamics", dynamics_of(audio))):
            report[f"{attr}_match"] = torch.tensor([float(a[attr] == h) if attr in a
                                                    else float("nan")
                                                    for a, h in zip(asked, heard)])
    return report


def listening_summary(report):
    """Medians / rates over clips of a listen() report: median RMS, share of all samples at full
    scale, share of clips with audible clipping / hiss / dropouts, share of register and dynamics
    matches (among prompts naming one)."""
    out = {"median_rms": float(report["rms"].median()),
           "full_scale": float(report["full_scale"].mean()),
           **{k: float(report[k].mean()) for k in HEARD_DEFECTS}}
    for key in (f"{attr}_match" for attr in READABLE):
        if key in report:
            m = report[key]
            out[key] = float(m[~m.isnan()].mean())
    return out


def preference(report_a, report_b):
    """The listener's choice between clip a and clip b of the same prompt and noise, clip by clip
    (two listen() reports): +1 prefers a, -1 prefers b, 0 no preference (a tie, dropped as the
    paper drops ties). Audible defects decide first (fewer of clipping, hiss, dropout), then
    following the prompt (more of the attributes it names that the audio matches: register,
    dynamics)."""
    def defects(r):
        return sum(r[d] for d in HEARD_DEFECTS)

    def follows(r):
        return sum(r[f"{attr}_match"].nan_to_num(0.0) for attr in READABLE if f"{attr}_match" in r)
    pref = torch.sign(defects(report_b) - defects(report_a))
    return torch.where(pref == 0, torch.sign(follows(report_a) - follows(report_b)), pref)


def paired_changes(report_a, report_b):
    """Clip by clip, what changed from b to a (two listen() reports of the same prompts and noise):
    for each defect the clips where only a has it ("a_only") and where only b has it ("b_only"), for
    each readable attribute the clips where only a matches the prompt and where only b does, and the
    exact two-sided sign-test p-value of the discordant clips (McNemar's exact test: under "no
    change" each discordant clip is a fair coin). Clips that agree say nothing about a change."""
    out = {}
    for key in [*HEARD_DEFECTS, *(f"{attr}_match" for attr in READABLE)]:
        if key not in report_a:
            continue
        # a NaN match (attribute not named) is False
        a, b = report_a[key] == 1.0, report_b[key] == 1.0
        a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
        p = scipy.stats.binomtest(a_only, a_only + b_only).pvalue if a_only + b_only else 1.0
        out[key] = {"a_only": a_only, "b_only": b_only, "p_value": float(p)}
    return out


def validate(audio, sr, captions, defects):
    """How well the listener hears clips whose truth is known (corpus clips: captions name their
    attributes, defects lists each clip's defects): per defect, the share of clips with it that are
    heard to have it and the false alarms among clips without it; per readable attribute, the share
    of clips heard as their caption says."""
    heard = listen(audio, sr, captions)
    out = {}
    for defect in ("hiss", "dropout", "clipping"):
        has = torch.tensor([defect in d for d in defects])
        out[defect] = {"found": float(heard[defect][has].mean()),
                       "false_alarms": float(heard[defect][~has].mean()),
                       "clips_with_it": int(has.sum())}
    for attr in READABLE:
        m = heard[f"{attr}_match"]
        out[attr] = {"accuracy": float(m[~m.isnan()].mean()), "clips": int((~m.isnan()).sum())}
    return out


def validate_on_corpus(data_cfg, codec):
    """validate on the test and validation clips of the synthetic corpus, as rendered and after the
    codec round trip (what the listener hears in generations has been through the codec)."""
    clips = [load_corpus(data_cfg, split) for split in ("test", "valid")]
    audio = torch.cat([c.audio for c in clips])
    defects, captions = [d for c in clips for d in c.defects], [p for c in clips
                                                                for p in c.captions]
    return {name: validate(a, data_cfg["sample_rate"], captions, defects)
            for name, a in (("as rendered", audio),
                            ("codec round trip", codec.decode(codec.encode(audio))))}


def validation_table(results):
    """Markdown table of validate() results, one row per audio version (e.g. as rendered, codec
    round trip)."""
    first = next(iter(results.values()))
    defects = [k for k in first if "found" in first[k]]
    attrs = [k for k in first if "accuracy" in first[k]]
    lines = [f"| listener on {first[attrs[0]]['clips']} corpus clips | "
             + " | ".join(f"{d} found / false alarms" for d in defects)
             + " | " + " | ".join(f"{a} accuracy" for a in attrs) + " |",
             "| --- " * (1 + len(defects) + len(attrs)) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | "
                     + " | ".join(f"{r[d]['found']:.2f} / {r[d]['false_alarms']:.2f} "
                                  f"({r[d]['clips_with_it']} with it)" for d in defects)
                     + " | " + " | ".join(f"{r[a]['accuracy']:.3f}" for a in attrs) + " |")
    return "\n".join(lines)
