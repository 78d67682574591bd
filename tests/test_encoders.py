import math
import warnings

import numpy as np
import pytest
import torch

from data import synthetic_corpus
from encoders import EncodecCodec, MelCodec, TextEncoder, minilm_path

SR = 16000


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus("valid", 120, SR, 2.0, seed=0, p_defect=0.5)


def mel_codec(**kw):
    args = dict(sample_rate=SR, n_mels=32, n_fft=1024, hop=250, f_min=30.0, f_max=8000.0,
                log_floor=1e-4, log_mean=-4.5, log_scale=9.0, griffin_lim_iters=16)
    args.update(kw)
    return MelCodec(**args)


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder("minilm", 32)


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


def test_mel_codec_decodes_a_clip_the_same_in_any_batch(corpus):
    """decode works clip by clip (over threads on a CPU): a clip's audio does not depend on the
    batch it is decoded in, which is what lets ranks score their shards (same thread count, same
    machine)."""
    codec, threads = mel_codec(), torch.get_num_threads()
    z = codec.encode(corpus.audio[:5])
    try:
        torch.set_num_threads(2)                               # two workers for five clips
        batch = codec.decode(z)
        alone = torch.cat([codec.decode(z[i:i + 1]) for i in range(len(z))])
        pair = codec.decode(z[3:5])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch, alone) and torch.equal(batch[3:5], pair)
    assert codec.decode(z[:0]).shape == (0, z.shape[-1] * codec.hop)       # a rank with no clips


def test_mel_codec_encodes_a_tone_in_the_right_band():
    t = torch.arange(SR) / SR
    codec = mel_codec()
    z = codec.encode((0.3 * torch.sin(2 * math.pi * 1000.0 * t))[None])
    n = codec.latent_channels + 2                                           # band edges and centres
    hz = 700 * (10 ** (np.linspace(2595 * np.log10(1 + 30 / 700),
                                   2595 * np.log10(1 + 8000 / 700), n) / 2595) - 1)
    # the band centred nearest 1 kHz
    assert abs(hz[1 + z[0].mean(dim=1).argmax().item()] - 1000.0) < 120


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
    n_tokens = [len(minilm.tokenizer(p)["input_ids"])
                for p in ["slow bells", "a loud and fast guitar tune over a drum beat"]]
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
    T5EncoderModel(T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4)) \
        .save_pretrained(tmp_path / "t5")
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(tmp_path / "t5")
    enc = TextEncoder(str(tmp_path / "t5"), 16)
    text, mask = enc(["a quick tune"])
    assert enc.dim == 32 and text.shape[-1] == 32 and mask.all()


def test_missing_text_encoder_fails_fast_naming_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="text_encoder.name="):
        TextEncoder(str(tmp_path / "nowhere"), 16)


def test_prompts_longer_than_max_tokens_warn_with_the_count():
    enc = TextEncoder("minilm", 8)
    long = "a rather long prompt about slow mellow strings in a minor key, with drums"
    with pytest.warns(UserWarning, match=r"1 of 2 prompts are longer than max_tokens=8 tokens"):
        enc(["a short prompt", long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # once per encoder
        enc([long + " and bells"])
