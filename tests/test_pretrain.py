import os

import pytest
import torch

from data import TextEncoder, load_corpus, make_codec
from model import DiT, DiTConfig, load_checkpoint, load_model, loss_per_example
from pretrain import load_config, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")

MICRO = ["data.n_train=48", "data.n_test=8", "data.clip_seconds=0.5", "codec.griffin_lim_iters=2",
         "model.width=32", "model.depth=1", "model.heads=2", "pretrain.batch_size=8", "pretrain.lr=0.003",
         "pretrain.warmup=1", "pretrain.ema_decay=0.8", "pretrain.ckpt_every=3", "pretrain.n_samples=2",
         "pretrain.n_check=4", "sampler.steps=3"]


def micro_cfg(tmp_path, *extra):
    return load_config(CONFIG, MICRO + [f"out_dir={tmp_path}", *extra])


def test_config_overrides_and_errors():
    cfg = load_config(CONFIG, ["pretrain.lr=0.01", "sampler.cfgpp_range=[0.1, 0.9]", "pretrain.steps=5",
                               "sampler.sigma_max=70"])
    assert cfg["pretrain"]["lr"] == 0.01 and cfg["sampler"]["cfgpp_range"] == [0.1, 0.9]
    assert cfg["sampler"]["sigma_max"] == 70.0 and isinstance(cfg["sampler"]["sigma_max"], float)
    with pytest.raises(KeyError, match=r"unknown config key 'pretrain.lrr'; allowed here: \[.*'lr'"):
        load_config(CONFIG, ["pretrain.lrr=1"])
    with pytest.raises(KeyError, match="unknown config key 'nosection'"):
        load_config(CONFIG, ["nosection.x=1"])
    with pytest.raises(TypeError, match="config key 'pretrain.steps' must be int .* got str 'many'"):
        load_config(CONFIG, ["pretrain.steps=many"])
    with pytest.raises(TypeError, match="'pretrain.resume' must be bool"):
        load_config(CONFIG, ["pretrain.resume=1"])
    with pytest.raises(KeyError, match="'model' is a section"):
        load_config(CONFIG, ["model=3"])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_config(CONFIG, ["pretrain.lr"])
    with pytest.raises(ValueError, match="model.latent_channels=16 must equal codec.n_mels=32"):
        load_config(CONFIG, ["model.latent_channels=16"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_every_config_key_has_a_comment():
    for line in open(CONFIG):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
            assert "#" in line or stripped.startswith("-"), f"config.yaml line without a comment: {line!r}"


def fixed_batch_loss(cfg, model):
    """EDM loss of the model on fixed training clips, sigmas and noise (no condition dropout)."""
    codec, enc = make_codec(cfg), TextEncoder("minilm", 32)
    corpus = load_corpus(cfg["data"], "train")
    x0 = codec.encode(corpus.audio[:16])
    text, mask = enc(corpus.captions[:16])
    g = torch.Generator().manual_seed(0)
    sigma = torch.exp(0.4 + torch.randn(16, generator=g))
    with torch.no_grad():
        return loss_per_example(model, x0, text, mask, sigma, torch.randn(x0.shape, generator=g)).mean().item()


def test_micro_pretraining_lowers_the_loss_and_writes_samples(tmp_path):
    cfg = micro_cfg(tmp_path, "pretrain.steps=40")
    base = pretrain(cfg)
    trained, ckpt = load_model(base)
    assert ckpt["step"] == 40 and ckpt["text_encoder"] == "minilm"
    init = DiT(DiTConfig(**cfg["model"]))          # zero-initialised output: F = 0, D = c_skip x
    assert fixed_batch_loss(cfg, trained.eval()) < 0.8 * fixed_batch_loss(cfg, init.eval())
    assert sorted(os.listdir(tmp_path / "samples")) == ["pretrain_00.wav", "pretrain_01.wav"]


def test_pretraining_resumes_bit_exactly(tmp_path):
    straight = micro_cfg(tmp_path / "a", "pretrain.steps=6", "pretrain.n_samples=0", "pretrain.n_check=0")
    pretrain(straight)
    first = micro_cfg(tmp_path / "b", "pretrain.steps=3", "pretrain.n_samples=0", "pretrain.n_check=0")
    pretrain(first)                                              # "interrupted" after 3 steps
    pretrain(micro_cfg(tmp_path / "b", "pretrain.steps=6", "pretrain.n_samples=0", "pretrain.n_check=0"))
    a = load_checkpoint(tmp_path / "a" / "pretrain_state.pt")
    b = load_checkpoint(tmp_path / "b" / "pretrain_state.pt")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
