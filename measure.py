"""Measurements of the parts (benchmark.py runs the paper's experiments): the cost of one DRAGON
round's generation and of scoring it with every reward, what the sampler's settings do to the base
model's generations, and how well the listener (listen.listen) hears known defects.

    python measure.py config.yaml [section.key=value ...]

Generates 80 clips (the paper's total batch) from held-out prompts with the base model and the
configured sampler, then scores them with each reward of eval.rewards and prints seconds per reward
next to the generation time. Rewards' models (offline CLAP, aesthetics head) and reference
statistics are fitted / cached on first use; that one-off cost is printed separately.

Then the same prompts and noise under sampler variants (SAMPLER_VARIANTS): what a listener
would notice (listen.listen: loudness, samples at full scale, hiss, dropouts, the prompt's
register) and the target reward (config section `reward`), next to the codec round trip of
test clips.

Then each reward on clean corpus clips made worse on purpose (EDITS: a silent gap, i.e. a dropout;
more gain, clipped at full scale): a reward that scores an edit above the clean clip rewards
that defect. Last, the listener's own accuracy on corpus clips with known defects.
"""
import sys
import time

import torch

from data import load_corpus, prompt_set
from encoders import clip_latent_length, make_codec, make_text_encoder
from listen import listen, listening_summary, validate_on_corpus, validation_table
from model import load_model
from launch import parse_args, setup_distributed, use_bf16
from pretrain import base_model
from sampler import generate_latents
from rewards import build_reward, build_reward_from_spec

# name -> audio [B, samples] -> edited audio
EDITS = {
    "+0.25 s silent gap (a dropout)": lambda a, sr: silent_gap(a, int(0.25 * sr)),
    "x3 gain, clipped at full scale": lambda a, sr: (3 * a).clamp(-1.0, 1.0),
}
# attribute -> its values, in rewards_on_edited_clips' table of what a reward prefers
BY_ATTRIBUTE = {"register": ("low", "mid", "high"), "dynamics": ("soft", "loud")}
# name -> overrides of config's sampler
SAMPLER_VARIANTS = {
    "config.yaml's sampler": {},
    "plain CFG (cfg_rescale 0)": {"cfg_rescale": 0.0},
    "CFG++ correction 'guided'": {"cfgpp_correction": "guided"},
    "previous default: CFG++ lambda 0.5 on the high-noise half, plain CFG, 'guided'":
        {"cfg_rescale": 0.0, "cfgpp_lambda": 0.5, "cfgpp_range": [0.0, 0.5],
         "cfgpp_correction": "guided"},
    "no guidance (w = 1, no CFG++)": {"cfg_scale": 1.0, "cfgpp_range": [0.0, 0.0]},
    "20 steps": {"steps": 20},
    "12 steps (the previous demonstration sampler)": {"steps": 12},
}


def main(cfg, n=80):
    _, _, device = setup_distributed(cfg, single="measure.py")
    # pre-trained first when missing
    model = load_model(base_model(cfg), map_location=device)[0].eval()
    codec = make_codec(cfg, device)
    text_encoder = make_text_encoder(cfg, device)
    prompts = (prompt_set(cfg["data"], "heldout") * 2)[:n]
    T = clip_latent_length(codec, cfg["data"])
    t0 = time.time()
    latents = generate_latents(model, prompts, list(range(n)), T, text_encoder, cfg["sampler"],
                               device, bf16=use_bf16(cfg["dragon"], device))
    t_gen = time.time() - t0
    t0 = time.time()
    codec.decode(latents)
    t_dec = time.time() - t0
    print(f"generate {n} clips ({cfg['sampler']['steps']} steps): {t_gen:.1f}s; decode to audio: "
          f"{t_dec:.1f}s")
    print(f"| reward | type | setup (one-off) s | score {n} clips s | value |")
    print("| --- | --- | --- | --- | --- |")
    for spec in cfg["eval"]["rewards"]:
        t0 = time.time()
        reward = build_reward_from_spec(cfg, spec, codec)
        t_setup = time.time() - t0
        t0 = time.time()
        features = reward.features(latents, prompts)
        value = reward.set_score(features, prompts)
        print(f"| {reward.name} | {reward.type} | {t_setup:.1f} | {time.time() - t0:.2f} | "
              f"{value:.4f} |", flush=True)
    sampler_variants(cfg, model, codec, text_encoder, prompts, T, device)
    if cfg["data"]["source"] == "synthetic":
        rewards_on_edited_clips(cfg, codec)
        listener_validation(cfg, codec)


def sampler_variants(cfg, model, codec, text_encoder, prompts, T, device):
    """The base model's generations for the same prompts and noise under each sampler variant."""
    sr, n = cfg["data"]["sample_rate"], len(prompts)
    reward = build_reward(cfg, codec)
    keys = ["median_rms", "full_scale", "clipping", "hiss", "dropout", "register_match",
            "dynamics_match"]
    print(f"\n| sampler ({n} held-out prompts, same noise) | " + " | ".join(keys)
          + f" | {reward.name} | s |")
    print("| --- " * (len(keys) + 3) + "|")
    test = load_corpus(cfg["data"], "test", n=n)
    rt = listening_summary(listen(codec.decode(codec.encode(test.audio)), sr, test.captions))
    print("| codec round trip of test clips | "
          + " | ".join(f"{rt.get(k, float('nan')):.3f}" for k in keys) + " | | |")
    for name, overrides in SAMPLER_VARIANTS.items():
        t0 = time.time()
        latents = generate_latents(model, prompts, list(range(n)), T, text_encoder,
                                   {**cfg["sampler"], **overrides},
                                   device, bf16=use_bf16(cfg["dragon"], device))
        seconds = time.time() - t0
        heard = listening_summary(listen(codec.decode(latents), sr, prompts))
        r = reward.features(latents, prompts)
        value = reward.set_score(r, prompts)
        print(f"| {name} | " + " | ".join(f"{heard[k]:.3f}" for k in keys)
              + f" | {value:.4f} | {seconds:.1f} |", flush=True)


def silent_gap(audio, n):
    """audio with n samples of silence in the middle of each clip."""
    out, start = audio.clone(), (audio.shape[1] - n) // 2
    out[:, start:start + n] = 0.0
    return out


def edited_clip_scores(cfg, codec, specs):
    """Each reward of `specs` on the n defect-free test and validation clips, as they are and after
    each of EDITS (through the codec, as a generation would be scored): (the clips' attributes,
    {reward name: {version: Scores}})."""
    corpora = [load_corpus(cfg["data"], split) for split in ("test", "valid")]
    clean = [(corpus, i) for corpus in corpora for i, d in enumerate(corpus.defects) if not d]
    if len(clean) < 2:
        raise ValueError(f"edited clips: only {len(clean)} defect-free test / validation clips")
    audio = torch.stack([corpus.audio[i] for corpus, i in clean])
    prompts = [corpus.captions[i] for corpus, i in clean]
    versions = {"clean": audio, **{name: edit(audio, cfg["data"]["sample_rate"])
                                   for name, edit in EDITS.items()}}
    latents = {name: codec.encode(a) for name, a in versions.items()}
    # decoded once, as in eval.py
    heard = {name: codec.decode(z) for name, z in latents.items()}
    # (version, encoder) -> features
    features, out = {}, {}
    for spec in specs:
        reward = build_reward_from_spec(cfg, spec, codec)
        for name, z in latents.items():
            if (name, reward.encoder) not in features:
                features[name, reward.encoder] = reward.features(z, prompts, heard[name])
        out[reward.name] = {name: reward.scores(features[name, reward.encoder], prompts)
                            for name in latents}
    return [corpus.attributes[i] for corpus, i in clean], out


def share_higher(by_version, edit):
    """The share of clips that score higher after `edit` than clean (one Scores per version of
    edited_clip_scores; a reward that scores an edit higher rewards that defect)."""
    return (by_version[edit].per_example > by_version["clean"].per_example).float().mean().item()


def rewards_on_edited_clips(cfg, codec):
    """Print edited_clip_scores for eval.rewards: the clips' reward and, for instance types, the
    share of clips the edit made score higher (a reward that scores an edit higher rewards that
    defect)."""
    attributes, scores = edited_clip_scores(cfg, codec, cfg["eval"]["rewards"])
    n = len(attributes)
    print(f"\n| reward on {n} defect-free corpus clips | " + " | ".join(["clean", *EDITS]) + " |")
    print("| --- " * (len(EDITS) + 2) + "|")
    for name, by_version in scores.items():
        cells = []
        for version, s in by_version.items():
            cell = f"{s.of(torch.arange(n)):.4f}"
            if version != "clean" and s.per_example is not None:
                cell += f" (higher in {share_higher(by_version, version):.0%})"
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


    # what an instance reward prefers among clean clips: its mean per register and dynamics
    print("\n| reward: mean on the clean clips by attribute | " + " | ".join(
        f"{a}: {v}" for a in BY_ATTRIBUTE for v in BY_ATTRIBUTE[a]) + " |")
    print("| --- " * (1 + sum(len(v) for v in BY_ATTRIBUTE.values())) + "|")
    for name, by_version in scores.items():
        s = by_version["clean"].per_example
        if s is None:
            continue
        cells = []
        for a, values in BY_ATTRIBUTE.items():
            for v in values:
                members = torch.tensor([x[a] == v for x in attributes])
                cells.append(f"{s[members].mean():.3f} ({int(members.sum())})" if members.any()
                             else "")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def listener_validation(cfg, codec):
    """How well listen.listen reads the synthetic world's known defects and attributes back from the
    audio (listen.validate), on test and validation clips as rendered and after the codec round
    trip."""
    print("\n" + validation_table(validate_on_corpus(cfg["data"], codec)), flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(parse_args(sys.argv[1:]))
