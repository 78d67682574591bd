"""Shared test fixtures: tiny models that run in milliseconds on a CPU."""
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clap import load_or_fit_clap  # noqa: E402
from data import load_corpus  # noqa: E402
from encoders import TextEncoder, make_codec  # noqa: E402
from launch import load_config  # noqa: E402
from model import DiT, DiTConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The test models are tiny: one thread avoids OpenMP hand-off costs that dominate (and explode
# when another process shares the two cores).
torch.set_num_threads(1)

TINY = dict(latent_channels=4, patch=2, width=32, depth=2, heads=4, text_dim=8)


def tiny_dit(randomize=True, seed=0, **overrides):
    """A 2-block DiT. randomize=True also fills the zero-initialised adaLN and output layers so
    the network is not the identity at init (needed to see text, mask and guidance effects)."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(**{**TINY, **overrides}))
    if randomize:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN" in name or "patch_out" in name:
                    p.normal_(0, 0.2)
    return model.eval()


def text_batch(B, L=5, D=8, lengths=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(B, L, D, generator=g)
    lengths = lengths or [L - (i % 3) for i in range(B)]
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return text, mask


@pytest.fixture
def tiny():
    return tiny_dit()


# A micro synthetic world with a fitted offline CLAP, shared by test_clap.py and test_rewards.py
REWARD_MICRO = ["device=cpu", "data.n_train=600", "data.n_valid=100", "data.n_test=8",
                "data.clip_seconds=1.0", "clap.window_frames=32", "clap.hop_frames=16",
                "codec.griffin_lim_iters=2", "clap.steps=250", "clap.batch_size=64",
                "clap.lr=0.003", "reward.n_reference=40", "aesthetics.max_clips=300",
                "data.rated_fraction=1.0"]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("rewards")
    cfg = load_config(os.path.join(ROOT, "config.yaml"), REWARD_MICRO + [f"out_dir={out}"])
    text_encoder = TextEncoder("minilm", 32)
    codec = make_codec(cfg)
    clap = load_or_fit_clap(cfg)
    test = load_corpus(cfg["data"], "test", n=8)
    return cfg, codec, text_encoder, clap, codec.encode(test.audio), test.captions


# Command-line runs for the kill -9 tests: one thread, offline, output discarded
CLI_ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_script(script, args):
    """Run `python SCRIPT config.yaml ARGS` to the end; fails the test with its stderr when it
    fails."""
    import subprocess
    p = subprocess.run([sys.executable, script, "config.yaml", *args], cwd=ROOT, env=CLI_ENV,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


def kill_9_when(script, args, ready, delay, timeout=300):
    """Start `python SCRIPT config.yaml ARGS`, wait until ready() holds, then delay seconds, then
    SIGKILL it (no handler runs: what a power cut or the OOM killer does). Asserts it was killed."""
    import signal
    import subprocess
    import time
    p = subprocess.Popen([sys.executable, script, "config.yaml", *args], cwd=ROOT, env=CLI_ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ready():
        assert p.poll() is None, f"{script} ended before the kill point"
        assert time.time() - t0 < timeout, f"{script}: kill point not reached in {timeout}s"
        time.sleep(0.01)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL, f"{script} ended before the kill"
