import copy
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from data import write_wav
from encoders import make_codec
from launch import load_config
from rewards import (REWARDS, LatentIdentity, build_reward, fad_from_stats, frechet_distance,
                     gaussian_stats, level_normalised, parse_reward, per_song_fad, reference_stats,
                     reward_name, set_stats, vendi_score)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_spd(d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return A @ A.T / (rank or d)


# ---- Frechet distance -------------------------------------------------------------------------

def test_frechet_matches_the_diagonal_closed_form():
    a, b = torch.rand(6, dtype=torch.float64) + 0.1, torch.rand(6, dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    expected = ((a.sqrt() - b.sqrt()) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
    assert (frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
            == pytest.approx(float(expected), rel=1e-10))


@pytest.mark.parametrize("rank1,rank2", [(None, None), (3, None), (2, 4)])
def test_frechet_matches_scipy_sqrtm(rank1, rank2):
    d = 8
    S1, S2 = random_spd(d, rank1, 1), random_spd(d, rank2, 2)
    mu1, mu2 = np.random.default_rng(0).standard_normal((2, d))
    covmean = scipy.linalg.sqrtm(S1.numpy() @ S2.numpy()).real
    expected = (((mu1 - mu2) ** 2).sum() + np.trace(S1.numpy()) + np.trace(S2.numpy())
                - 2 * np.trace(covmean))
    got = frechet_distance(mu1, S1.numpy(), mu2, S2.numpy())          # numpy inputs work too
    assert isinstance(got, float)
    assert got == pytest.approx(expected, abs=1e-6)


def test_fad_of_a_set_with_itself_is_zero_and_never_negative():
    x = torch.randn(50, 6, dtype=torch.float64)
    st = gaussian_stats(x)
    assert abs(frechet_distance(st["mu"], st["sigma"], st["mu"], st["sigma"])) < 1e-8
    for seed in range(5):
        # rank 2
        y = gaussian_stats(torch.randn(3, 6, generator=torch.Generator().manual_seed(seed)))
        assert frechet_distance(y["mu"], y["sigma"], st["mu"], st["sigma"]) >= 0


def test_batched_per_song_fad_equals_the_loop():
    ref = gaussian_stats(torch.randn(200, 5, dtype=torch.float64))
    # 4 frames in 5-d: rank-deficient
    frames = torch.randn(7, 4, 5)
    batched = per_song_fad(frames, ref)
    for b in range(7):
        st = gaussian_stats(frames[b])
        assert batched[b].item() == pytest.approx(-frechet_distance(st["mu"], st["sigma"],
                                                                    ref["mu"], ref["sigma"]),
                                                  rel=1e-5)


def test_pooled_set_statistics_equal_the_direct_computation():
    ref = gaussian_stats(torch.randn(100, 4, dtype=torch.float64))
    frames = torch.randn(6, 9, 4)
    stats = set_stats(frames)
    # one set, then several at once (a repeated example pools its frames twice)
    sets = torch.tensor([[0, 2, 5], [1, 1, 3], [5, 4, 0]])
    batched = fad_from_stats(stats, sets, ref)
    for k, members in enumerate(sets):
        pooled = gaussian_stats(frames[members].reshape(-1, 4))
        direct = -frechet_distance(pooled["mu"], pooled["sigma"], ref["mu"], ref["sigma"])
        assert fad_from_stats(stats, members, ref) == pytest.approx(direct, rel=1e-9)
        assert batched[k].item() == pytest.approx(direct, rel=1e-9)


# ---- Vendi ------------------------------------------------------------------------------------

def test_vendi_extremes_and_a_hand_value():
    assert vendi_score(torch.eye(5) * 3) == pytest.approx(5.0)            # orthogonal: n
    assert vendi_score(torch.ones(4, 3)) == pytest.approx(1.0)            # identical: 1
    # several sets at once
    assert vendi_score(torch.stack([torch.eye(4), torch.ones(4, 4)])).tolist() == pytest.approx(
        [4.0, 1.0])
    # two unit vectors with cosine c: eig(K/2) = (1 +- c)/2
    c = 0.6
    lam = np.array([(1 + c) / 2, (1 - c) / 2])
    x = torch.tensor([[1.0, 0.0], [c, np.sqrt(1 - c * c)]])
    assert vendi_score(x) == pytest.approx(float(np.exp(-(lam * np.log(lam)).sum())))


# ---- bad input --------------------------------------------------------------------------------

def test_per_song_fad_bad_input():
    ref = gaussian_stats(torch.randn(20, 4))
    with pytest.raises(ValueError, match="at least 2 frames per clip, got 1"):
        per_song_fad(torch.randn(3, 1, 4), ref)
    with pytest.raises(ValueError, match="dimension 5 but the reference statistics have 4"):
        per_song_fad(torch.randn(3, 6, 5), ref)


# ---- the offline CLAP and the rewards built from config ---------------------------------------

def reward_for(world, **spec):
    cfg, codec, text_encoder, _, latents, prompts = world
    c = copy.deepcopy(cfg)
    c["reward"].update(spec)
    reward = build_reward(c, codec)
    return reward, reward.features(latents, prompts), prompts


def test_clap_score_is_a_cosine(world):
    reward, f, prompts = reward_for(world, kind="clap_score")
    s = reward.score(f, prompts)
    assert reward.type == "instance-to-instance" and s.shape == (8,)
    assert (s.abs() <= 1 + 1e-6).all()
    # the matching prompt scores higher on average than a shuffled one
    assert s.mean() > reward.score(f, prompts[1:] + prompts[:1]).mean()


def test_features_from_the_callers_decode_equal_the_rewards_own(world):
    codec, latents = world[1], world[4]
    reward, f, prompts = reward_for(world, kind="clap_score")
    assert torch.equal(reward.features(latents, prompts, codec.decode(latents)), f)


def test_aesthetics_predictor_fits_ratings(world):
    reward, f, _ = reward_for(world, kind="aesthetics")
    from model import load_checkpoint
    head = load_checkpoint(os.path.join(world[0]["out_dir"], "rewards", "aesthetics.pt"))
    assert head["report"]["plcc"] > 0.3, head["report"]
    assert head["report"]["n_val"] == round(0.15 * 300)
    s = reward.score(f)
    assert reward.type == "instance" and s.shape == (8,) and torch.isfinite(s).all()


def test_level_rms_scales_every_clip_to_the_target_rms():
    audio = torch.randn(3, 4000) * torch.tensor([[0.01], [0.2], [1.5]])
    out = level_normalised(audio, 0.1)
    assert torch.allclose(out.pow(2).mean(1).sqrt(), torch.full((3,), 0.1), rtol=1e-5)
    assert torch.equal(level_normalised(audio, 0.0), audio)


LATENT_PSFAD = dict(kind="fad_per_song", encoder="latent", reference="audio:alim")


@pytest.mark.parametrize("spec", [dict(kind="clap_score"), LATENT_PSFAD])
def test_level_rms_makes_a_reward_blind_to_loudness(world, spec):
    """The same clips at half the level: scored as they are, the reward changes; with
    reward.level_rms > 0 it does not (so that DRAGON cannot win by level)."""
    _, codec, _, _, latents, prompts = world
    audio = codec.decode(latents)
    quiet = audio * 0.5
    for level_rms, same in ((0.0, False), (0.1, True)):
        reward, _, _ = reward_for(world, level_rms=level_rms, **spec)
        loud_s = reward.score(reward.features(latents, prompts, audio), prompts)
        quiet_s = reward.score(reward.features(codec.encode(quiet), prompts, quiet), prompts)
        assert torch.allclose(loud_s, quiet_s, atol=1e-4) == same, (level_rms, loud_s, quiet_s)


@pytest.mark.parametrize("encoder,reference", [("latent", "audio:alim"), ("clap", "audio:sd"),
                                               ("clap", "text:alim")])
def test_per_song_fad_rewards(world, encoder, reference):
    reward, f, _ = reward_for(world, kind="fad_per_song", encoder=encoder, reference=reference)
    s = reward.score(f)
    assert reward.type == "instance-to-distribution" and s.shape == (8,) and (s <= 1e-9).all()
    # a set's reward is its clips' mean, also for a batch of sets
    of = reward.scores(f, None).of
    assert of(torch.tensor([[0, 3, 5], [7, 7, 1]])).tolist() == pytest.approx(
        [s[[0, 3, 5]].mean().item(), s[[7, 7, 1]].mean().item()])


def test_text_exemplars_need_a_cross_modal_encoder(world):
    with pytest.raises(ValueError, match="text exemplars need a cross-modal encoder"):
        reward_for(world, kind="fad_per_song", encoder="latent", reference="text:alim")


def test_set_rewards(world):
    fad, f, _ = reward_for(world, kind="fad_dataset", encoder="clap", reference="audio:alim")
    assert fad.is_set and fad.set_score(f) <= 0
    vendi, fv, _ = reward_for(world, kind="vendi", encoder="clap")
    assert vendi.is_set and 1.0 <= vendi.set_score(fv) <= 8.0
    # a batch of sets scores as each set alone
    sets = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [0, 2, 4, 6]])
    for reward, features in ((fad, f), (vendi, fv)):
        of = reward.scores(features, None).of
        assert of(sets).tolist() == pytest.approx([of(m) for m in sets], rel=1e-9)


def test_reference_cache_is_reused_and_invalidated_when_the_encoder_or_data_change(world):
    cfg, codec, _, _, _, _ = world
    calls = []

    def embed(audio):
        calls.append(len(audio))
        return codec.encode(audio).transpose(1, 2)
    a = reference_stats(cfg, LatentIdentity(cfg), "audio:sd", embed)
    b = reference_stats(cfg, LatentIdentity(cfg), "audio:sd", embed)
    assert len(calls) == 1 and torch.equal(a["mu"], b["mu"])            # reused from disk
    other = copy.deepcopy(cfg)
    other["codec"]["log_scale"] = 4.5                                    # a different encoder
    codec2 = make_codec(other)
    c = reference_stats(other, LatentIdentity(other), "audio:sd",
                        lambda x: codec2.encode(x).transpose(1, 2))
    assert not torch.allclose(c["mu"], a["mu"])
    assert (reference_stats(cfg, LatentIdentity(cfg), "audio:sd", embed) is not None
            and len(calls) == 2)
    # the same encoder on other exemplar clips (the digitally silent world): fitted again
    silent = dict(cfg, data=dict(cfg["data"], noise_floor=0.0))
    d = reference_stats(silent, LatentIdentity(silent), "audio:sd", embed)
    assert len(calls) == 3 and not torch.allclose(d["mu"], a["mu"])


def test_reward_bad_input(world):
    cfg, codec, text_encoder, _, latents, prompts = world
    reward, _, _ = reward_for(world, kind="clap_score")
    bad = latents.clone()
    bad[2, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"reward clap_score: examples \[2\] contain NaN"):
        reward.features(bad, prompts)
    silent = torch.full_like(latents, -50.0)                             # decodes to silence
    with pytest.raises(ValueError, match=r"reward clap_score: clips \[0, 1, .*\] are silent"):
        reward.features(silent, prompts)
    with pytest.raises(ValueError, match="reward.kind must be one of"):
        reward_for(world, kind="fid")
    with pytest.raises(ValueError, match="reward.reference must be 'audio:NAME' or 'text:NAME'"):
        reward_for(world, kind="fad_per_song", encoder="latent", reference="alim")
    empty = os.path.join(cfg["out_dir"], "empty.txt")
    open(empty, "w").write("# nothing\n")
    with pytest.raises(ValueError, match="empty.txt has no entries"):
        reward_for(world, kind="fad_per_song", encoder="clap", reference=f"text:{empty}")


def test_reward_specs_take_paths_and_names_follow_the_table():
    assert parse_reward("vendi/clap") == {"kind": "vendi", "encoder": "clap"}
    assert parse_reward("fad_per_song/latent/audio:/data/my refs/ref.tsv") == {
        "kind": "fad_per_song", "encoder": "latent", "reference": "audio:/data/my refs/ref.tsv"}
    with pytest.raises(ValueError, match="kind must be one of"):
        parse_reward("fad/latent")
    rc = {"encoder": "latent", "reference": "text:sd"}
    assert [reward_name({**rc, "kind": k}) for k in REWARDS] == [
        "aesthetics", "clap_score", "fad_per_song[latent,text:sd]", "fad_dataset[latent,text:sd]",
        "vendi[latent]"]


def test_adding_a_reward_is_one_row_in_the_table(world, monkeypatch):
    """rewards.py's worked example: cosine of a clip's mean embedding to the exemplar set's mean."""
    import rewards

    def cosine_to_exemplars(cfg, codec, clap, frames, ref, name, rank):
        mu = ref["mu"].float()
        return {"score": lambda f, prompts=None: torch.nn.functional.cosine_similarity(
            f.mean(1), mu[None], dim=-1)}
    monkeypatch.setitem(rewards.REWARDS, "cosine_exemplar", ("instance-to-distribution", None, True,
                                                              cosine_to_exemplars))
    reward, f, prompts = reward_for(world, kind="cosine_exemplar", encoder="latent",
                                    reference="audio:sd")
    assert (reward.name == "cosine_exemplar[latent,audio:sd]"
            and reward.type == "instance-to-distribution")
    # cached
    mu = rewards.reference_stats(world[0], LatentIdentity(world[0]), "audio:sd", None)["mu"].float()
    # by hand, per clip
    expected = [float(torch.dot(x, mu) / (x.norm() * mu.norm())) for x in f.mean(1)]
    torch.testing.assert_close(reward.scores(f, prompts).per_example.float(),
                               torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert parse_reward("cosine_exemplar/latent/audio:sd")["kind"] == "cosine_exemplar"


def test_reference_caches_keep_one_file_per_encoder_and_follow_the_listed_files(world, tmp_path):
    cfg, codec, _, clap, _, _ = world
    calls = []

    def counted(embed):
        return lambda audio: calls.append(len(audio)) or embed(audio)
    latent = counted(lambda audio: codec.encode(audio).transpose(1, 2))
    windows = counted(lambda audio: clap.window_embeddings(codec.decode(codec.encode(audio))))
    # computed now or by another test
    reference_stats(cfg, LatentIdentity(cfg), "audio:alim", latent)
    reference_stats(cfg, clap, "audio:alim", windows)
    computed = len(calls)
    # alternating encoders: nothing is recomputed
    for _ in range(2):
        reference_stats(cfg, LatentIdentity(cfg), "audio:alim", latent)
        reference_stats(cfg, clap, "audio:alim", windows)
    assert len(calls) == computed <= 2
    assert {"ref_mel_audio_alim.pt", "ref_small_audio_alim.pt"} <= set(
        os.listdir(os.path.join(cfg["out_dir"], "rewards")))
    from data import synthetic_corpus, write_wav
    clips = synthetic_corpus("test", 3, 16000, 1.0, seed=5)
    for i in range(3):
        write_wav(tmp_path / f"{i}.wav", clips.audio[i].numpy(), 16000)
    ref = tmp_path / "ref.tsv"
    ref.write_text("".join(f"{i}.wav\t{clips.captions[i]}\n" for i in range(3)))
    assert reference_stats(cfg, LatentIdentity(cfg), f"audio:{ref}", latent)["count"] == 3
    # the list is cut: the cache must not answer
    ref.write_text("0.wav\tjust one\n")
    assert reference_stats(cfg, LatentIdentity(cfg), f"audio:{ref}", latent)["count"] == 1
    # a song's silent end
    write_wav(tmp_path / "silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    ref.write_text("0.wav\ta\nsilence.wav\tb\n")
    with pytest.warns(UserWarning, match=r"audio:.*ref.tsv: left out 1 silent clips of 2"):
        assert reference_stats(cfg, clap, f"audio:{ref}", windows)["count"] == 1
    ref.write_text("silence.wav\tb\n")
    with pytest.raises(ValueError, match="all 1 clips are silent"):
        reference_stats(cfg, clap, f"audio:{ref}", windows)


def test_folder_misuse_is_reported_before_any_model_is_fitted(tmp_path, monkeypatch):
    # Each mistake a user bringing their own music makes is named, with what to do, before the
    # offline CLAP (minutes) or the aesthetics head is fitted.
    import rewards
    from test_clap import folder_of_clips
    train, test = folder_of_clips(tmp_path, rated=False)

    def no_fit(*args, **kwargs):
        raise AssertionError("a model was fitted before the data was checked")
    monkeypatch.setattr(rewards, "load_or_fit_clap", no_fit)
    base = ["device=cpu", "data.source=folder", f"data.train_captions={train}",
            "data.clip_seconds=0.5", f"out_dir={tmp_path / 'out'}"]

    def fails(match, *extra):
        cfg = load_config(os.path.join(ROOT, "config.yaml"), base + list(extra))
        with pytest.raises(ValueError, match=match):
            build_reward(cfg, make_codec(cfg))
    fails("clap.kind=small on data.source=folder checks its fit on held-out files")
    fails(r"aesthetics needs 1-5 ratings of at least 20 training files, but .*train.tsv rates 0: "
          r"add a rating as a third tab-separated column .* or use a reward that needs none: "
          r"clap_score", f"data.test_captions={test}")
    fails("text exemplars need a cross-modal encoder", "reward.kind=fad_per_song",
          "reward.encoder=latent", f"reward.reference=text:{tmp_path / 'prompts.txt'}")
    fails("names a synthetic exemplar set, but data.source='folder'", "reward.kind=fad_dataset",
          "reward.encoder=latent", "reward.reference=audio:sd")
    write_wav(tmp_path / "silence.wav", np.zeros(8000, dtype=np.float32), 16000)
    (tmp_path / "quiet.tsv").write_text("silence.wav\tnothing\n")
    fails(r"audio:.*quiet.tsv: all 1 clips are silent", "reward.kind=fad_per_song",
          "reward.encoder=clap", f"data.test_captions={test}",
          f"reward.reference=audio:{tmp_path / 'quiet.tsv'}")
