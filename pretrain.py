"""EDM pre-training of the base text-to-music model (the f_ref that DRAGON starts from).

    python pretrain.py config.yaml [section.key=value ...]
    torchrun --standalone --nproc_per_node=N pretrain.py config.yaml

The paper pre-trains for 5 days on 32 A100s; the default config here reaches a usable base in
about 15 minutes on a 2-core CPU: the EDM loss (model.loss_per_example) with log-normal sigma and
10% condition dropout, Adam with warm-up, an EMA of the weights as the base model, resumable
atomic checkpoints, WAV samples from held-out prompts, and a check that the generations follow
the prompt's pitch register. This file also holds what the three scripts share: config loading,
device and torchrun set-up.
"""
import copy
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from launch import autocast, log, parse_args, seeded_generator, setup_distributed, use_bf16
from data import cycled, load_corpus, prompt_set, write_wav
from encoders import TextEncoder, clip_latent_length, make_codec
from listen import listen, listening_summary
from model import DiT, DiTConfig, count_parameters, drop_condition, load_checkpoint, loss_per_example, sample_sigma
from model import save_atomic, save_model, update_ema
from sampler import generate_latents

# =============================================================================================
# Data: latents and text states of the training split
# =============================================================================================

def encode_in_batches(codec, audio, batch=256):
    return torch.cat([codec.encode(audio[i:i + batch]) for i in range(0, len(audio), batch)])


def training_tensors(cfg, codec, text_encoder):
    """Latents [N, C, T], text states [N, L, D] and mask [N, L] of the training split."""
    corpus = load_corpus(cfg["data"], "train")
    latents = encode_in_batches(codec, corpus.audio)
    text, mask = text_encoder(corpus.captions)
    return latents, text, mask


# =============================================================================================
# Pre-training
# =============================================================================================

def lr_at(step, cfg):
    return cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["warmup"]))


def pretrain(cfg):
    """Train the base model; returns the path of the EMA checkpoint out_dir/base.pt."""
    rank, world, device = setup_distributed(cfg)
    pc, out = cfg["pretrain"], cfg["out_dir"]
    state_path, base_path = os.path.join(out, "pretrain_state.pt"), os.path.join(out, "base.pt")
    torch.manual_seed(cfg["seed"])
    codec = make_codec(cfg)
    text_encoder = TextEncoder(cfg["text_encoder"]["name"], cfg["text_encoder"]["max_tokens"])
    if codec.latent_channels != cfg["model"]["latent_channels"] or text_encoder.dim != cfg["model"]["text_dim"]:
        raise ValueError(f"model.latent_channels={cfg['model']['latent_channels']} / model.text_dim="
                         f"{cfg['model']['text_dim']} must match the codec ({codec.latent_channels}) and the "
                         f"text encoder ({text_encoder.dim})")
    t0 = time.time()
    latents, text, mask = training_tensors(cfg, codec, text_encoder)
    log(rank, f"data: {len(latents)} clips -> latents {tuple(latents.shape[1:])}, std {latents.std():.3f}, "
              f"text states {tuple(text.shape[1:])} ({time.time() - t0:.0f}s)")

    model = DiT(DiTConfig(**cfg["model"])).to(device)
    model.grad_checkpointing = pc["grad_checkpointing"]
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=pc["lr"])
    step = 0
    if pc["resume"] and os.path.isfile(state_path):
        state = load_checkpoint(state_path, map_location=device)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        log(rank, f"resumed from {state_path} at step {step}")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log(rank, f"model: {count_parameters(model) / 1e6:.2f}M parameters, {world} process(es) on {device}")

    B = pc["batch_size"] // world
    if B * world != pc["batch_size"]:
        raise ValueError(f"pretrain.batch_size={pc['batch_size']} must be divisible by the {world} processes")
    bar = tqdm(total=pc["steps"], initial=step, desc="pretrain", disable=rank != 0, dynamic_ncols=True)
    while step < pc["steps"]:
        g = seeded_generator(cfg["seed"], step, rank)
        idx = torch.randint(len(latents), (B,), generator=g)
        x0, c = latents[idx].to(device), text[idx].to(device)
        m = drop_condition(mask[idx], pc["cond_dropout"], g).to(device)          # 10% condition dropout
        sigma = sample_sigma(B, pc["P_mean"], pc["P_std"], g).to(device)        # ln sigma ~ N(P_mean, P_std^2)
        noise = torch.randn(x0.shape, generator=g).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, pc)
        with autocast(device, use_bf16(pc, device)):
            loss = loss_per_example(train_model, x0, c, m, sigma, noise).mean()  # EDM loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretrain: loss is {loss.item()} at step {step}; the last good "
                                     f"checkpoint is {state_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), pc["grad_clip"])
        opt.step()
        update_ema(ema, model, pc["ema_decay"])
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_at(step - 1, pc):.1e}")
        if rank == 0 and (step % pc["ckpt_every"] == 0 or step == pc["steps"]):
            save_atomic({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                         "step": step, "model_config": cfg["model"]}, state_path)
    bar.close()
    if rank == 0:
        save_model(base_path, ema, step=step, text_encoder=cfg["text_encoder"]["name"],
                   codec=cfg["codec"]["kind"], sample_rate=cfg["data"]["sample_rate"])
        log(rank, f"saved the base model (EMA) to {base_path}")
        if pc["n_samples"] or pc["n_check"]:
            check_base(cfg, ema, codec, text_encoder, device)
    if world > 1:
        dist.barrier()
    return base_path


def check_base(cfg, model, codec, text_encoder, device):
    """WAV samples from held-out prompts, and what a listener would notice in n_check generations
    from held-out prompts next to the codec round trip of real clips (listen.listen): loudness, samples at
    full scale, hiss, dropouts and, on the synthetic corpus, how often the measured pitch register
    matches the one the prompt names (chance: 1/3). Written to out_dir/check.json."""
    pc, sr = cfg["pretrain"], cfg["data"]["sample_rate"]
    heldout = prompt_set(cfg["data"], "heldout")
    n = max(pc["n_samples"], pc["n_check"])
    prompts = cycled(heldout, n)                                  # new seeds for the repeats
    T = clip_latent_length(codec, cfg["data"])
    t0 = time.time()
    audio = codec.decode(generate_latents(model, prompts, list(range(len(prompts))), T, text_encoder,
                                          cfg["sampler"], device, bf16=use_bf16(cfg["pretrain"], device)))
    for i in range(min(pc["n_samples"], len(prompts))):
        path = os.path.join(cfg["out_dir"], "samples", f"pretrain_{i:02d}.wav")
        write_wav(path, audio[i], sr)
        tqdm.write(f"  {path}: {prompts[i]}")
    if not pc["n_check"]:
        return None
    synthetic = cfg["data"]["source"] == "synthetic"
    real = load_corpus(cfg["data"], "test" if synthetic or cfg["data"]["test_captions"] else "train").audio
    real = real[torch.linspace(0, len(real) - 1, min(n, len(real))).long()]   # spread over the split's files
    round_trip = codec.decode(codec.encode(real))
    report = {name: {"clips": len(a), **listening_summary(listen(a, sr, p)), "rms_quartiles": rms_quartiles(a)}
              for name, a, p in (("generated", audio, prompts if synthetic else None),
                                 ("codec_round_trip", round_trip, None))}
    for name, r in report.items():
        tqdm.write(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    if synthetic:
        tqdm.write(f"register check: {report['generated']['register_match']:.1%} of held-out generations match "
                   f"the prompt's register (chance 33.3%) [{time.time() - t0:.0f}s]")
    with open(os.path.join(cfg["out_dir"], "check.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def rms_quartiles(audio):
    """25th, 50th and 75th percentile of the clips' RMS."""
    return [round(float(q), 4) for q in audio.pow(2).mean(1).sqrt().quantile(torch.tensor([0.25, 0.5, 0.75]))]


if __name__ == "__main__":
    pretrain(parse_args(sys.argv[1:]))
