"""Shared test fixtures: tiny models that run in milliseconds on a CPU."""
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import DiT, DiTConfig  # noqa: E402

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
