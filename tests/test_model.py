import math
import os

import pytest
import torch

from conftest import text_batch, tiny_dit
from model import (DiT, DiTConfig, denoise, drop_condition, edm_scalings, edm_weight, load_model,
                   loss_per_example, null_condition, sample_sigma, save_model)

SIGMAS = torch.tensor([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)


def test_edm_weight_times_c_out_squared_is_one():
    for sigma_data in (0.5, 1.3):
        _, c_out, _, _ = edm_scalings(SIGMAS, sigma_data)
        torch.testing.assert_close(edm_weight(SIGMAS, sigma_data) * c_out ** 2,
                                   torch.ones_like(SIGMAS))


def test_edm_scalings_hand_values():
    # sigma = sigma_d = 0.5: c_skip = 1/2, c_out = 0.25/sqrt(0.5), c_in = 1/sqrt(0.5),
    # c_noise = ln(0.5)/4
    c_skip, c_out, c_in, c_noise = edm_scalings(torch.tensor(0.5, dtype=torch.float64), 0.5)
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(0.25 / math.sqrt(0.5))
    assert c_in.item() == pytest.approx(1 / math.sqrt(0.5))
    assert c_noise.item() == pytest.approx(math.log(0.5) / 4)


def test_loss_per_example_equals_weighted_x0_error():
    model = tiny_dit()
    x0 = torch.randn(6, 4, 8)
    noise = torch.randn(6, 4, 8)
    sigma = torch.tensor([0.01, 0.2, 0.5, 1.0, 5.0, 40.0])
    text, mask = text_batch(6)
    e = loss_per_example(model, x0, text, mask, sigma, noise)
    assert e.shape == (6,)
    with torch.no_grad():
        D = denoise(model, x0 + sigma[:, None, None] * noise, sigma, text, mask)
    direct = edm_weight(sigma, 0.5) * ((D - x0) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(e.detach(), direct, rtol=2e-4, atol=1e-5)


def test_loss_is_zero_for_the_exact_denoiser_of_a_point_mass():
    # data = a single point x0 = 0 -> the exact denoiser is D = 0, i.e. F* = -c_skip x / c_out; a
    # model whose F returns that target has zero loss. Check through a stub network.
    class Exact(torch.nn.Module):
        config = DiTConfig(latent_channels=4, patch=2, width=8, depth=1, heads=1, text_dim=8)

        def forward(self, x_in, c_noise, text, mask):
            sigma = (4 * c_noise).exp()[:, None, None]
            c_skip, c_out, c_in, _ = edm_scalings(sigma, 0.5)
            return -c_skip * (x_in / c_in) / c_out
    x0 = torch.zeros(3, 4, 8)
    text, mask = text_batch(3)
    e = loss_per_example(Exact(), x0, text, mask, torch.tensor([0.1, 1.0, 10.0]),
                         torch.randn(3, 4, 8))
    assert e.abs().max() < 1e-8


def test_output_shape():
    model = tiny_dit()
    text, mask = text_batch(3)
    out = denoise(model, torch.randn(3, 4, 16), 1.0, text, mask)
    assert out.shape == (3, 4, 16)


def test_zero_init_gives_skip_connection_only():
    model = tiny_dit(randomize=False)
    x = torch.randn(4, 4, 8)
    text, mask = text_batch(4)
    for sigma in (0.01, 0.5, 10.0):
        expected = 0.25 / (sigma ** 2 + 0.25) * x        # c_skip x with sigma_d = 0.5
        torch.testing.assert_close(denoise(model, x, sigma, text, mask), expected)


def test_padding_mask_hides_padded_tokens():
    model = tiny_dit()
    x = torch.randn(3, 4, 8)
    text, mask = text_batch(3, lengths=[5, 3, 1])
    changed = text.clone()
    changed[~mask] = 100 * torch.randn(int((~mask).sum()), 8)
    a = denoise(model, x, 0.7, text, mask)
    b = denoise(model, x, 0.7, changed, mask)
    torch.testing.assert_close(a, b)
    changed_real = text.clone()
    # a real token does change the output
    changed_real[0, 0] = torch.randn(8)
    assert (denoise(model, x, 0.7, changed_real, mask)[0] - a[0]).abs().max() > 1e-4


def test_null_condition_ignores_text():
    model = tiny_dit()
    x = torch.randn(2, 4, 8)
    text_a, mask = text_batch(2, seed=1)
    text_b, _ = text_batch(2, seed=2)
    null = null_condition(mask)
    torch.testing.assert_close(denoise(model, x, 1.0, text_a, null),
                               denoise(model, x, 1.0, text_b, null))
    assert (denoise(model, x, 1.0, text_a, mask)
            - denoise(model, x, 1.0, text_b, mask)).abs().max() > 1e-4


def test_condition_dropout_drops_whole_prompts_at_rate_p():
    _, mask = text_batch(4000, L=4, lengths=[4] * 4000)
    dropped = drop_condition(mask, 0.1, torch.Generator().manual_seed(0))
    rows_off = ~dropped.any(dim=1)
    assert (dropped[~rows_off] == mask[~rows_off]).all()      # kept prompts untouched
    assert abs(rows_off.float().mean().item() - 0.1) < 0.015  # 3 sigma of Binomial(4000, 0.1)
    assert not drop_condition(mask, 0.0).logical_xor(mask).any()


def test_log_normal_sigma_sampler():
    sigma = sample_sigma(20000, 0.4, 1.0, torch.Generator().manual_seed(0))
    assert abs(sigma.log().mean().item() - 0.4) < 0.03
    assert abs(sigma.log().std().item() - 1.0) < 0.03


def test_tiny_model_overfits_a_handful_of_examples():
    torch.manual_seed(0)
    model = DiT(DiTConfig(latent_channels=4, patch=2, width=64, depth=2, heads=4, text_dim=8))
    x0 = torch.randn(4, 4, 8) * 0.5
    noise = torch.randn(4, 4, 8)
    sigma = torch.tensor([0.3, 0.6, 1.0, 2.0])
    text, mask = text_batch(4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = loss_per_example(model, x0, text, mask, sigma, noise).mean().item()
    for _ in range(300):
        loss = loss_per_example(model, x0, text, mask, sigma, noise).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny_dit().train()
        model.grad_checkpointing = ckpt
        text, mask = text_batch(2)
        g = torch.Generator().manual_seed(3)
        loss_per_example(model, torch.randn(2, 4, 8, generator=g), text, mask,
                         torch.tensor([0.5, 2.0]),
                         torch.randn(2, 4, 8, generator=g)).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = tiny_dit()
    path = tmp_path / "sub" / "base.pt"
    save_model(path, model, step=7)
    assert sorted(os.listdir(path.parent)) == ["base.pt"]          # no temporary file left over
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 7 and ckpt["model_config"]["width"] == 32
    loaded, _ = load_model(path)
    text, mask = text_batch(2)
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(denoise(loaded.eval(), x, 0.3, text, mask),
                               denoise(model, x, 0.3, text, mask))


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="model.width=30 must be divisible by model.heads=4"):
        DiTConfig(width=30, heads=4)
    model = tiny_dit()
    text, mask = text_batch(1)
    with pytest.raises(ValueError, match="divisible by patch=2"):
        denoise(model, torch.randn(1, 4, 7), 1.0, text, mask)
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_model(tmp_path / "nowhere.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="broken.pt could not be read"):
        load_model(tmp_path / "broken.pt")
