import copy
import os

import pytest
import torch

from clap import CAPTION_TOKENS, clap_retrieval, clap_text_encoder, fit_small_clap, load_or_fit_clap
from encoders import make_codec
from rewards import build_reward


def test_offline_clap_retrieval_beats_chance_by_a_wide_margin(world):
    cfg, _, text_encoder, clap, _, _ = world
    report = clap_retrieval(clap.model, clap.mel, text_encoder, cfg)
    assert report["top5"] > 5 * report["chance_top5"], report     # chance: 5%
    assert os.path.isfile(os.path.join(cfg["out_dir"], "rewards", "clap.pt"))


def test_clap_embeddings_are_normalised_and_paraphrases_agree(world):
    _, _, _, clap, _, _ = world
    t = clap.text_embedding(["fast guitar with drums", "quick guitar over a drum beat",
                             "slow bells solo"])
    torch.testing.assert_close(t.norm(dim=1), torch.ones(3))
    assert (t[0] @ t[1]) > (t[0] @ t[2])


def test_fitted_reward_models_are_reused_and_refitted_when_their_config_changes(world, monkeypatch):
    import clap as clap_module
    cfg, _, text_encoder, clap, _, _ = world
    fits = []
    real = clap_module.fit_small_clap
    monkeypatch.setattr(clap_module, "fit_small_clap",
                        lambda *a, **k: fits.append(1) or real(*a, **k))
    again = load_or_fit_clap(cfg)
    assert fits == [] and again.identity == clap.identity                 # loaded from disk
    changed = copy.deepcopy(cfg)
    changed["clap"]["steps"] = 5
    load_or_fit_clap(changed)
    assert fits == [1]


def test_offline_clap_fit_does_not_depend_on_the_global_rng(world):
    # a benchmark fits CLAP after pre-training, train.py before anything: same config, same weights
    cfg, codec, _, _, _, _ = world
    cfg = copy.deepcopy(cfg)
    cfg["clap"]["steps"] = 3
    # as load_or_fit_clap
    text_encoder = clap_text_encoder(cfg["text_encoder"]["name"], CAPTION_TOKENS)
    mel = make_codec(dict(cfg, codec=dict(cfg["codec"], kind="mel", griffin_lim_iters=0)))
    fits = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        fits.append(fit_small_clap(cfg, mel, text_encoder)[0].state_dict())
    for k in fits[0]:
        assert torch.equal(fits[0][k], fits[1][k]), k


def tiny_hf_clap(folder):
    """A tiny random transformers ClapModel with its feature extractor and a tokenizer, saved
    locally."""
    from transformers import AutoTokenizer, ClapAudioConfig, ClapConfig, ClapFeatureExtractor
    from transformers import ClapModel, ClapTextConfig
    from encoders import minilm_path
    text = ClapTextConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    audio = ClapAudioConfig(hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1],
                            num_attention_heads=[2, 2], window_size=8, spec_size=128,
                            num_mel_bins=64, enable_fusion=False, projection_hidden_size=32)
    torch.manual_seed(0)
    ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(),
                         projection_dim=16)).save_pretrained(folder)
    ClapFeatureExtractor(feature_size=64, sampling_rate=8000, max_length_s=2, hop_length=160,
                         fft_window_size=400, frequency_max=4000).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)


def test_transformers_clap_backend_from_a_local_folder(world, tmp_path):
    cfg, codec, text_encoder, _, latents, prompts = world
    tiny_hf_clap(tmp_path / "clap")
    c = copy.deepcopy(cfg)
    c["clap"].update(kind="hf", path=str(tmp_path / "clap"), window_seconds=0.5, hop_seconds=0.25)
    c["reward"].update(kind="clap_score")
    reward = build_reward(c, codec)
    # 1 s clips resampled to 8 kHz: 3 windows
    f = reward.features(latents, prompts)
    assert f.shape == (8, 3, 16)
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(8, 3))
    torch.testing.assert_close(reward.features(latents, prompts), f)      # deterministic windows
    s = reward.score(f, prompts)
    assert s.shape == (8,) and (s.abs() <= 1 + 1e-6).all()
    c["clap"]["path"] = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="clap.path="):
        build_reward(c, codec)


def folder_of_clips(tmp_path, n=24, rated=True):
    """n synthetic clips written as WAV files with a captions file (ratings in the third column)."""
    from data import synthetic_corpus, write_wav
    clips = synthetic_corpus("train", n, 16000, 1.0, seed=3, p_defect=0.5)
    lines = []
    for i in range(n):
        write_wav(tmp_path / f"clip {i}.wav", clips.audio[i].numpy(), 16000)
        lines.append(f"clip {i}.wav\t{clips.captions[i]}"
                     + (f"\t{clips.ratings[i]:.2f}" if rated else ""))
    (tmp_path / "train.tsv").write_text("\n".join(lines[:18]) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join(lines[18:]) + "\n")
    return tmp_path / "train.tsv", tmp_path / "test.tsv"


def test_offline_clap_and_aesthetics_fit_on_a_folder_corpus(tmp_path):
    from launch import load_config
    train, test = folder_of_clips(tmp_path)
    micro = ["data.source=folder", f"data.train_captions={train}", "data.clip_seconds=0.5",
             "codec.griffin_lim_iters=2", "clap.window_frames=32", "clap.hop_frames=16",
             "clap.steps=20", "clap.batch_size=16", f"out_dir={tmp_path / 'out'}"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "config.yaml"), micro)
    with pytest.raises(ValueError, match="set data.valid_captions or data.test_captions"):
        load_or_fit_clap(cfg)
    cfg = load_config(os.path.join(root, "config.yaml"), micro + [f"data.test_captions={test}"])
    # 36 windows of 18 files, captions as written
    clap = load_or_fit_clap(cfg)
    assert clap.window_embeddings(torch.zeros(2, 8000)).shape[0] == 2
    codec = make_codec(cfg)
    with pytest.raises(ValueError, match=r"aesthetics needs 1-5 ratings of at least 20 training "
                                         r"files, but .*train.tsv rates 18: add a rating as a "
                                         r"third tab-separated column"):
        build_reward(cfg, codec)                        # 36 rated windows, but 18 files
    fad = copy.deepcopy(cfg)
    fad["reward"].update(kind="fad_per_song", encoder="latent", reference="audio:alim")
    with pytest.raises(ValueError, match="names a synthetic exemplar set, but "
                                         "data.source='folder'"):
        build_reward(fad, codec)
    # the user's exemplar files work
    fad["reward"]["reference"] = f"audio:{test}"
    assert build_reward(fad, codec).type == "instance-to-distribution"


def test_offline_clap_fits_a_corpus_smaller_than_its_batch(world):
    # clap.batch_size above the number of training clips: every step takes the whole corpus
    cfg, codec, _, _, _, _ = world
    cfg = copy.deepcopy(cfg)
    cfg["clap"].update(steps=2, batch_size=100_000)
    text_encoder = clap_text_encoder(cfg["text_encoder"]["name"], CAPTION_TOKENS)
    mel = make_codec(dict(cfg, codec=dict(cfg["codec"], kind="mel", griffin_lim_iters=0)))
    model = fit_small_clap(cfg, mel, text_encoder)[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
