import numpy as np
import pytest
import torch

from data import (ATTRIBUTES, Corpus, attributes_from_prompt, folder_corpus, list_fingerprint,
                  load_audio, prompt_set, random_attributes, read_wav, render_clip, resample,
                  synthetic_corpus, user_prompts, write_wav)

SR = 16000


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus("valid", 120, SR, 2.0, seed=0, p_defect=0.5)


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


def test_ratings_fall_with_defect_severity(corpus):
    severity = np.array([sum(d.values()) for d in corpus.defects])
    ratings = corpus.ratings.numpy()
    assert set(np.unique(ratings)) <= {1, 2, 3, 4, 5}
    clean, bad = ratings[severity == 0], ratings[severity > 0]
    assert len(clean) > 20 and len(bad) > 20                  # both kinds are in the data
    assert clean.mean() - bad.mean() > 1.5
    assert np.corrcoef(severity, ratings)[0, 1] < -0.7


def render_pair(defect, severity=1.0):
    attrs = dict(instrument="flute", register="mid", tempo="medium", density="sparse",
                 scale="major", percussion="none", dynamics="soft", key="D")
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
    # DRAGON's prompts, without audio
    train = prompt_set(dict(cfg, n_train=12), "train")
    assert train == synthetic_corpus("train", 12, SR, 0.1, 0, p_defect=0.5).captions


def test_folder_train_prompts_are_the_captions_column(tmp_path):
    (tmp_path / "caps.tsv").write_text("a.wav\tslow piano\t4\n# comment\nb.wav\t fast drums \n")
    cfg = dict(source="folder", train_captions=str(tmp_path / "caps.tsv"))
    # the audio files need not be read
    assert prompt_set(cfg, "train") == ["slow piano", "fast drums"]
    (tmp_path / "bad.tsv").write_text("a.wav\tok\nb.wav\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected 'path<TAB>caption"):
        prompt_set(dict(cfg, train_captions=str(tmp_path / "bad.tsv")), "train")


# ---- audio I/O and real data -----------------------------------------------------------------

def test_wav_round_trip_resample_and_mono(tmp_path):
    t = np.arange(SR) / SR
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t),
                       0.1 * np.sin(2 * np.pi * 440 * t)]).astype(np.float32)
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
    files = {"u8.wav": np.round(x * 128 + 128).astype(np.uint8),   # 8-bit WAV is unsigned
             "i16.wav": np.round(x * 32768).astype(np.int16),
             "i32.wav": np.round(x * 2 ** 31).astype(np.int32), "f32.wav": x.astype(np.float32)}
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
    write_wav(tmp_path / "long.wav",
              0.1 * np.random.default_rng(0).standard_normal(int(2.5 * SR)), SR)
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


def test_list_files_report_their_own_line_numbers_and_fingerprint_their_files(tmp_path):
    write_wav(tmp_path / "a.wav", 0.1 * np.random.default_rng(0).standard_normal(SR), SR)
    (tmp_path / "caps.tsv").write_text("# my captions\n\na.wav\tsoft noise\r\n\n"
                                       "# one more\nb.wav\n")
    with pytest.raises(ValueError, match=r"caps.tsv:6: expected 'path<TAB>caption"):
        folder_corpus(tmp_path / "caps.tsv", SR, 1.0)
    before = list_fingerprint(tmp_path / "caps.tsv")
    assert ([e[0] for e in before] == ["a.wav\tsoft noise", "b.wav"]
            and before[1][1:] == [None, None])
    # replaced audio
    write_wav(tmp_path / "a.wav", 0.1 * np.random.default_rng(1).standard_normal(2 * SR), SR)
    assert list_fingerprint(tmp_path / "caps.tsv") != before
