import math

import numpy as np
import pytest
import torch

from data import (ATTRIBUTES, Corpus, EncodecCodec, MelCodec, TextEncoder, attributes_from_prompt, detect_defects,
                  folder_corpus, load_audio, melody_pitch, minilm_path, prompt_set, random_attributes, read_wav, register_of,
                  render_clip, resample, synthetic_corpus, user_prompts, write_wav)

SR = 16000


def mel_codec(**kw):
    args = dict(sample_rate=SR, n_mels=32, n_fft=1024, hop=250, f_min=30.0, f_max=8000.0, log_floor=1e-4,
                log_mean=-4.5, log_scale=9.0, griffin_lim_iters=16)
    args.update(kw)
    return MelCodec(**args)


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus("valid", 120, SR, 2.0, seed=0, p_defect=0.5)


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder("minilm", 32)


# ---- the synthetic world --------------------------------------------------------------------

def test_corpus_is_deterministic_and_clip_i_depends_only_on_seed_split_i():
    a = synthetic_corpus("train", 4, SR, 1.0, seed=3)
    b = synthetic_corpus("train", 6, SR, 1.0, seed=3)
    assert torch.equal(a.audio, b.audio[:4]) and a.captions == b.captions[:4]
    assert not torch.equal(a.audio, synthetic_corpus("train", 4, SR, 1.0, seed=4).audio)
    assert not torch.equal(a.audio, synthetic_corpus("test", 4, SR, 1.0, seed=3).audio)
    assert a.audio.shape == (4, SR) and a.audio.dtype == torch.float32


def test_captions_name_exactly_the_clip_attributes(corpus):
    for caption, attrs in zip(corpus.captions, corpus.attributes):
        assert attributes_from_prompt(caption) == {a: attrs[a] for a in ATTRIBUTES}, caption
        assert f" {attrs['key']} " in f" {caption} ".replace(",", " ")
    assert len(set(corpus.captions)) == len(corpus)            # phrasings vary


def test_phrasings_never_share_a_phrase_across_values():
    for attr, values in ATTRIBUTES.items():
        for value, phrases in values.items():
            for p in phrases:
                assert attributes_from_prompt(p).get(attr) == value, (attr, value, p)


def test_measured_pitch_register_matches_the_attribute(corpus):
    # an independent physical check: the spectral pitch of the audio, not the generator's bookkeeping
    got = register_of(corpus.audio, SR)
    want = [a["register"] for a in corpus.attributes]
    assert np.mean([g == w for g, w in zip(got, want)]) > 0.95


def test_pitch_estimator_on_pure_tones():
    t = torch.arange(SR) / SR
    tones = torch.stack([0.3 * torch.sin(2 * math.pi * f * t) for f in (110.0, 330.0, 880.0)])
    torch.testing.assert_close(melody_pitch(tones, SR), torch.tensor([110.0, 330.0, 880.0]), atol=4.0, rtol=0)
    assert register_of(tones, SR) == ["low", "mid", "high"]


def test_ratings_fall_with_defect_severity(corpus):
    severity = np.array([sum(d.values()) for d in corpus.defects])
    ratings = corpus.ratings.numpy()
    assert set(np.unique(ratings)) <= {1, 2, 3, 4, 5}
    clean, bad = ratings[severity == 0], ratings[severity > 0]
    assert len(clean) > 20 and len(bad) > 20                  # both kinds are in the data
    assert clean.mean() - bad.mean() > 1.5
    assert np.corrcoef(severity, ratings)[0, 1] < -0.7


def render_pair(defect, severity=1.0):
    attrs = dict(instrument="flute", register="mid", tempo="medium", density="sparse", scale="major",
                 percussion="none", dynamics="soft", key="D")
    clean = render_clip(attrs, {}, SR, 2.0, np.random.default_rng(0))
    bad = render_clip(attrs, {defect: severity}, SR, 2.0, np.random.default_rng(0))
    return clean, bad


def test_defects_are_audible():
    def hf_energy(a):
        return (np.abs(np.fft.rfft(a))[int(5000 * 2):] ** 2).sum()    # above 5 kHz (0.5 Hz bins)
    clean, hiss = render_pair("hiss")
    assert hf_energy(hiss) > 100 * hf_energy(clean)
    clean, clipped = render_pair("clipping")
    crest = lambda a: np.abs(a).max() / np.sqrt((a ** 2).mean())   # noqa: E731
    assert crest(clipped) < 0.8 * crest(clean)
    clean, dropped = render_pair("dropout")
    silent = lambda a: np.mean(np.abs(a) < 1e-6)                     # noqa: E731
    assert silent(dropped) > silent(clean) + 0.1


def test_detect_defects_finds_a_gap_and_hiss_but_not_short_pauses_between_notes():
    t = np.arange(2 * SR) / SR
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    gap = tone.copy()
    gap[SR // 2: SR // 2 + int(0.1 * SR)] = 0                            # a 100 ms cut-out
    pauses = tone.copy()
    for start in (0.4, 0.9, 1.4):                                        # three 20 ms pauses between notes
        pauses[int(start * SR): int((start + 0.02) * SR)] = 0
    hiss = tone + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    found = detect_defects(torch.tensor(np.stack([tone, gap, pauses, hiss]), dtype=torch.float32), SR)
    assert found == [set(), {"dropout"}, set(), {"hiss"}]


def test_exemplar_sets_differ_in_character():
    sd = synthetic_corpus("exemplar_sd", 40, SR, 1.0, 0, p_defect=0.0,
                          restrict={"percussion": ["none"], "dynamics": ["soft"]})
    assert all(a["percussion"] == "none" and a["dynamics"] == "soft" for a in sd.attributes)
    assert all(d == {} for d in sd.defects)


def test_prompt_sets():
    cfg = dict(source="synthetic", seed=0, n_test=10, p_defect=0.5)
    heldout = prompt_set(cfg, "heldout")
    test = synthetic_corpus("test", 10, SR, 0.1, 0, p_defect=0.5)
    assert heldout == test.captions                           # held-out prompts = test captions
    user, attrs = user_prompts(10, 0)
    assert prompt_set(cfg, "user") == user
    for p, a in zip(user, attrs):
        assert all(a[k] == v for k, v in attributes_from_prompt(p).items())
    with pytest.raises(ValueError, match="unknown prompt set 'nope'"):
        prompt_set(cfg, "nope")
    train = prompt_set(dict(cfg, n_train=12), "train")               # DRAGON's prompts, without audio
    assert train == synthetic_corpus("train", 12, SR, 0.1, 0, p_defect=0.5).captions


def test_folder_train_prompts_are_the_captions_column(tmp_path):
    (tmp_path / "caps.tsv").write_text("a.wav\tslow piano\t4\n# comment\nb.wav\t fast drums \n")
    cfg = dict(source="folder", train_captions=str(tmp_path / "caps.tsv"))
    assert prompt_set(cfg, "train") == ["slow piano", "fast drums"]   # the audio files need not be read
    (tmp_path / "bad.tsv").write_text("a.wav\tok\nb.wav\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected 'path<TAB>caption"):
        prompt_set(dict(cfg, train_captions=str(tmp_path / "bad.tsv")), "train")


# ---- codec ------------------------------------------------------------------------------------

def test_mel_codec_shapes_scale_and_round_trip(corpus):
    codec = mel_codec()
    audio = corpus.audio[:24]
    z = codec.encode(audio)
    assert z.shape == (24, 32, 128) and codec.frame_rate == 64.0
    assert 0.35 < z.std().item() < 0.65                       # near sigma_data = 0.5
    back = codec.decode(z)
    assert back.shape == audio.shape
    assert torch.equal(back, codec.decode(z))                  # deterministic decoding
    rt = codec.encode(back)
    assert (rt - z).pow(2).mean().sqrt().item() < 0.15         # latent round trip, 0.3 sigma_data
    # in the loud time-frequency cells (where the music is) the round trip is much tighter
    loud = z > 0.5
    assert (rt - z)[loud].abs().median().item() < 0.05


def test_mel_codec_encodes_a_tone_in_the_right_band():
    t = torch.arange(SR) / SR
    codec = mel_codec()
    z = codec.encode((0.3 * torch.sin(2 * math.pi * 1000.0 * t))[None])
    n = codec.latent_channels + 2                                           # band edges and centres
    hz = 700 * (10 ** (np.linspace(2595 * np.log10(1 + 30 / 700), 2595 * np.log10(1 + 8000 / 700), n) / 2595) - 1)
    assert abs(hz[1 + z[0].mean(dim=1).argmax().item()] - 1000.0) < 120   # the band centred nearest 1 kHz


def test_mel_decoding_clamps_latents_to_audible_range():
    codec = mel_codec()
    z = torch.full((1, 32, 16), 50.0)                     # far beyond a full-scale tone
    audio = codec.decode(z)
    assert torch.isfinite(audio).all() and audio.abs().max() < 50
    silence = codec.decode(torch.full((1, 32, 16), -50.0))
    assert silence.abs().max() < 1e-3


def test_codec_rejects_nan_audio():
    audio = torch.zeros(3, SR)
    audio[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"codec.encode: clips \[1\] contain NaN"):
        mel_codec().encode(audio)


def test_encodec_codec_from_a_local_tiny_random_model(tmp_path):
    from transformers import EncodecConfig, EncodecModel
    cfg = EncodecConfig(sampling_rate=8000, hidden_size=16, num_filters=4, upsampling_ratios=[4, 2],
                        codebook_size=32, num_lstm_layers=1, target_bandwidths=[1.5])
    EncodecModel(cfg).save_pretrained(tmp_path / "encodec")
    codec = EncodecCodec(str(tmp_path / "encodec"), latent_scale=0.1)
    assert codec.latent_channels == 16 and codec.hop == 8
    z = codec.encode(torch.randn(2, 800) * 0.1)
    assert z.shape == (2, 16, 100)
    assert codec.decode(z).shape == (2, 800)
    with pytest.raises(FileNotFoundError, match="codec.path="):
        EncodecCodec(str(tmp_path / "missing"), 0.1)


# ---- text encoder ----------------------------------------------------------------------------

def test_minilm_loads_offline_with_a_real_vocabulary(minilm):
    assert len(minilm.tokenizer) == 30522 and minilm.dim == 384
    text, mask = minilm(["slow bells", "a loud and fast guitar tune over a drum beat"])
    n_tokens = [len(minilm.tokenizer(p)["input_ids"]) for p in ["slow bells", "a loud and fast guitar tune over a drum beat"]]
    assert text.shape == (2, max(n_tokens), 384)
    assert mask.sum(dim=1).tolist() == n_tokens
    assert (text[0, n_tokens[0]:] == 0).all()
    # same prompt, same states, whatever the batch; paraphrases are closer than unrelated prompts
    again, _ = minilm(["slow bells"])
    torch.testing.assert_close(again[0, : n_tokens[0]], text[0, : n_tokens[0]])
    pooled = [minilm([p])[0][0].mean(0) for p in ("fast guitar", "quick guitar", "slow deep bells")]
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[2], dim=0)
    with pytest.raises(ValueError, match="empty prompt"):
        minilm(["ok", "  "])


def test_text_encoder_loads_a_t5_encoder_from_a_folder(tmp_path):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel
    T5EncoderModel(T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)) \
        .save_pretrained(tmp_path / "t5")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path / "t5")
    enc = TextEncoder(str(tmp_path / "t5"), 16)
    text, mask = enc(["a quick tune"])
    assert enc.dim == 32 and text.shape[-1] == 32 and mask.all()


def test_missing_text_encoder_fails_fast_naming_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder.name="):
        TextEncoder(str(tmp_path / "nowhere"), 16)


# ---- audio I/O and real data -----------------------------------------------------------------

def test_wav_round_trip_resample_and_mono(tmp_path):
    t = np.arange(SR) / SR
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32)
    write_wav(tmp_path / "s.wav", stereo, SR)
    a, sr = read_wav(tmp_path / "s.wav")
    assert sr == SR and a.shape == (2, SR) and np.abs(a - stereo).max() < 1e-4
    mono = load_audio(tmp_path / "s.wav", 22050)
    assert mono.shape == (1, 22050)
    spectrum = np.abs(np.fft.rfft(mono[0]))
    assert abs(np.argmax(spectrum) * 22050 / 22050 - 440) <= 1            # the tone keeps its pitch
    assert abs(np.abs(mono).max() - 0.3) < 0.01                             # mean of the channels
    assert resample(stereo, SR, SR) is stereo


def test_wav_sample_formats_read_as_the_same_signal(tmp_path):
    import scipy.io.wavfile
    x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(800) / SR)
    files = {"u8.wav": np.round(x * 128 + 128).astype(np.uint8),               # 8-bit WAV is unsigned
             "i16.wav": np.round(x * 32768).astype(np.int16), "i32.wav": np.round(x * 2 ** 31).astype(np.int32),
             "f32.wav": x.astype(np.float32)}
    for name, data in files.items():
        scipy.io.wavfile.write(tmp_path / name, SR, data)
        a, _ = read_wav(tmp_path / name)
        assert np.abs(a[0] - x).max() < 1 / 120, name                          # 8-bit: 1/128 steps
    scipy.io.wavfile.write(tmp_path / "hot.wav", SR, (1.71 * x / 0.5).astype(np.float32))
    with pytest.warns(UserWarning, match="hot.wav peaks at 1.71, beyond full scale"):
        a, _ = read_wav(tmp_path / "hot.wav")
    assert abs(np.abs(a).max() - 1.71) < 1e-3                                  # kept as it is


def test_bad_audio_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFFjunk")
    with pytest.raises(ValueError, match="junk.wav could not be read"):
        read_wav(tmp_path / "junk.wav")
    import scipy.io.wavfile
    scipy.io.wavfile.write(tmp_path / "nan.wav", SR, np.array([0.0, np.nan, 0.1], dtype=np.float32))
    with pytest.raises(ValueError, match="nan.wav contains NaN"):
        read_wav(tmp_path / "nan.wav")
    write_wav(tmp_path / "r8k.wav", np.zeros(800), 8000)
    with pytest.raises(ValueError, match="r8k.wav has sample rate 8000 Hz, expected 16000"):
        load_audio(tmp_path / "r8k.wav", SR, allow_resample=False)


def test_folder_corpus_cuts_windows_and_names_bad_lines(tmp_path):
    write_wav(tmp_path / "long.wav", 0.1 * np.random.default_rng(0).standard_normal(int(2.5 * SR)), SR)
    write_wav(tmp_path / "short.wav", np.zeros(SR // 4), SR)
    (tmp_path / "caps.tsv").write_text("long.wav\tsoft noise\t4\n")
    c = folder_corpus(tmp_path / "caps.tsv", SR, 1.0)
    assert isinstance(c, Corpus) and c.audio.shape == (2, SR) and c.captions == ["soft noise"] * 2
    assert c.ratings.tolist() == [4.0, 4.0]
    (tmp_path / "bad.tsv").write_text("long.wav\t  \n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: empty caption for long.wav"):
        folder_corpus(tmp_path / "bad.tsv", SR, 1.0)
    (tmp_path / "short.tsv").write_text("short.wav\tquiet\n")
    with pytest.raises(ValueError, match="short.tsv:1: short.wav is 0.25 s long"):
        folder_corpus(tmp_path / "short.tsv", SR, 1.0)
    (tmp_path / "rating.tsv").write_text("long.wav\tok\tgreat\n")
    with pytest.raises(ValueError, match="rating 'great' is not a number"):
        folder_corpus(tmp_path / "rating.tsv", SR, 1.0)
    (tmp_path / "gone.tsv").write_text("gone.wav\tok\n")
    with pytest.raises(FileNotFoundError, match="gone.wav"):
        folder_corpus(tmp_path / "gone.tsv", SR, 1.0)


def test_random_attributes_respect_restrictions():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = random_attributes(rng, {"instrument": ["bell"], "tempo": ["fast", "slow"]})
        assert a["instrument"] == "bell" and a["tempo"] in ("fast", "slow")
