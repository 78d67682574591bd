import os

import torch

from conftest import kill_9_when, run_script

from data import load_corpus
from encoders import TextEncoder, make_codec
from model import DiT, DiTConfig, load_checkpoint, load_model, loss_per_example
from launch import load_config
from pretrain import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")

MICRO = ["device=cpu", "data.n_train=48", "data.n_test=8", "data.clip_seconds=0.5",
         "codec.griffin_lim_iters=2", "model.width=32", "model.depth=1", "model.heads=2",
         "pretrain.batch_size=8", "pretrain.lr=0.003", "pretrain.warmup=1",
         "pretrain.ema_decay=0.8", "pretrain.ckpt_every=3", "pretrain.n_check=4",
         "sampler.steps=3"]


def micro_cfg(tmp_path, *extra):
    return load_config(CONFIG, MICRO + [f"out_dir={tmp_path}", *extra])


def fixed_batch_loss(cfg, model):
    """EDM loss of the model on fixed training clips, sigmas and noise (no condition dropout)."""
    codec, enc = make_codec(cfg), TextEncoder("minilm", 32)
    corpus = load_corpus(cfg["data"], "train")
    x0 = codec.encode(corpus.audio[:16])
    text, mask = enc(corpus.captions[:16])
    g = torch.Generator().manual_seed(0)
    sigma = torch.exp(0.4 + torch.randn(16, generator=g))
    with torch.no_grad():
        return loss_per_example(model, x0, text, mask, sigma,
                                torch.randn(x0.shape, generator=g)).mean().item()


def test_micro_pretraining_lowers_the_loss_and_writes_samples(tmp_path):
    cfg = micro_cfg(tmp_path, "pretrain.steps=40")
    base = pretrain(cfg)
    trained, ckpt = load_model(base)
    assert ckpt["step"] == 40 and ckpt["text_encoder"] == "minilm"
    init = DiT(DiTConfig(**cfg["model"]))          # zero-initialised output: F = 0, D = c_skip x
    assert fixed_batch_loss(cfg, trained.eval()) < 0.8 * fixed_batch_loss(cfg, init.eval())
    # n_check
    assert sorted(os.listdir(tmp_path / "samples")) == [f"pretrain_{i:02d}.wav" for i in range(4)]


def test_pretraining_resumes_bit_exactly(tmp_path):
    straight = micro_cfg(tmp_path / "a", "pretrain.steps=6", "pretrain.n_check=0")
    pretrain(straight)
    first = micro_cfg(tmp_path / "b", "pretrain.steps=3", "pretrain.n_check=0")
    pretrain(first)                                              # "interrupted" after 3 steps
    pretrain(micro_cfg(tmp_path / "b", "pretrain.steps=6", "pretrain.n_check=0"))
    a = load_checkpoint(tmp_path / "a" / "pretrain_state.pt")
    b = load_checkpoint(tmp_path / "b" / "pretrain_state.pt")
    assert a["step"] == b["step"] == 6
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_kill_9_and_resume_through_the_command_line(tmp_path):
    """python pretrain.py killed with SIGKILL twice (just after its first checkpoint, and a moment
    after a later one), then run again: the same weights, EMA and Adam state as an uninterrupted
    run."""
    args = [*MICRO, "pretrain.steps=300", "pretrain.ckpt_every=10", "pretrain.n_check=0"]
    run_script("pretrain.py", [*args, f"out_dir={tmp_path / 'straight'}"])
    killed = [*args, f"out_dir={tmp_path / 'killed'}"]
    state = tmp_path / "killed" / "pretrain_state.pt"

    def checkpoint_after(step):
        def ready():
            try:
                return load_checkpoint(state)["step"] >= step
            except (FileNotFoundError, RuntimeError, EOFError):    # not written yet
                return False
        return ready
    kill_9_when("pretrain.py", killed, checkpoint_after(10), delay=0.0)
    assert load_checkpoint(state)["step"] < 300
    kill_9_when("pretrain.py", killed, checkpoint_after(40), delay=0.02)
    assert load_checkpoint(state)["step"] < 300
    run_script("pretrain.py", killed)
    a = load_checkpoint(tmp_path / "straight" / "pretrain_state.pt")
    b = load_checkpoint(state)
    assert a["step"] == b["step"] == 300
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k, v in a["optimizer"]["state"].items():
        assert all(torch.equal(v[n], b["optimizer"]["state"][k][n]) for n in v), k
    base_a, base_b = (load_checkpoint(tmp_path / "straight" / "base.pt"),
                      load_checkpoint(tmp_path / "killed" / "base.pt"))
    assert all(torch.equal(base_a["model"][k], base_b["model"][k]) for k in base_a["model"])
