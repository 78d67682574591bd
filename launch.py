"""What every script does at launch: read config.yaml with `section.key=value` overrides (unknown
keys and wrong types are errors), set up the device and torchrun, bf16 autocast, rank-0 logging.
Plumbing only (compare nanoGPT's configurator.py and EDM's torch_utils/distributed.py); it imports
nothing from this repository, and pretrain.py, train.py, eval.py, measure.py and benchmark.py
import it.
"""
import datetime
import gc
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

# =============================================================================================
# Config: one YAML file, overridable as section.key=value; unknown keys and wrong types are errors
# =============================================================================================

def set_key(cfg, dotted, value, where):
    """Set cfg[a][b] = value for dotted 'a.b', checking that the key exists and the type fits."""
    keys = dotted.split(".")
    node = cfg
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            allowed = sorted(node) if isinstance(node, dict) else []
            raise KeyError(f"{where}: unknown config key '{'.'.join(keys[:i + 1])}'; allowed here: "
                           f"{allowed}")
        if i < len(keys) - 1:
            node = node[k]
    old = node[keys[-1]]
    if isinstance(old, float) and isinstance(value, str):
        try:
            value = float(value)                 # YAML 1.1 reads 1e-5 (no dot) as a string
        except ValueError:
            pass
    if isinstance(old, dict):
        raise KeyError(f"{where}: '{dotted}' is a section; set one of its keys: {sorted(old)}")
    if isinstance(old, bool) != isinstance(value, bool) or (
            not isinstance(old, bool) and old is not None and not isinstance(value, type(old))
            and not (isinstance(old, float) and isinstance(value, int))
            and not (isinstance(old, list) and isinstance(value, tuple))):
        raise TypeError(f"{where}: config key '{dotted}' must be {type(old).__name__} (default "
                        f"{old!r}), got {type(value).__name__} {value!r}")
    node[keys[-1]] = (float(value) if isinstance(old, float) and not isinstance(value, bool)
                      else value)


def load_config(path, overrides=()):
    """The config dict from `path` with `key=value` overrides (values parsed as YAML), checked
    once loaded: the data.* files, model.latent_channels, section dragon's values."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"command-line override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), yaml.safe_load(value), "command line")
    d = cfg["data"]
    for key in ("train_captions", "valid_captions", "test_captions", "heldout_prompts",
                "user_prompts"):
        if d[key] and d["source"] != "folder":
            raise ValueError(f"data.{key}={d[key]!r} is only read with data.source=folder (source "
                             f"is {d['source']!r})")
        if d[key] and not os.path.isfile(d[key]):
            raise FileNotFoundError(f"data.{key}: file not found: {d[key]}")
    if cfg["model"]["latent_channels"] != cfg["codec"]["n_mels"] and cfg["codec"]["kind"] == "mel":
        raise ValueError(f"model.latent_channels={cfg['model']['latent_channels']} must equal "
                         f"codec.n_mels={cfg['codec']['n_mels']}")
    check_dragon_values(cfg["dragon"])
    return cfg


DRAGON_CHOICES = {"loss": ("dpo", "kto"),
                  "sets": ("paired", "unpaired", "greedy", "loo", "set_vs_set"),
                  "lr_schedule": ("constant", "linear")}


def check_dragon_values(dc):
    """The values of config section dragon that need no reward (train.py checks dragon.sets
    against the reward's type); load_config runs it, benchmark.py again after a run's overrides."""
    for key, allowed in DRAGON_CHOICES.items():
        if dc[key] not in allowed:
            raise ValueError(f"dragon.{key}={dc[key]!r}: allowed values are {list(allowed)}")
    if not 0 <= dc["p_ref"] <= 1:
        raise ValueError(f"dragon.p_ref must be in [0, 1], got {dc['p_ref']}")
    for key in ("beta", "kto_beta", "lr"):
        if not dc[key] > 0:
            raise ValueError(f"dragon.{key} must be positive, got {dc[key]}")
    if not (isinstance(dc["noise_draws"], int) and dc["noise_draws"] >= 1):
        raise ValueError(f"dragon.noise_draws must be a whole number >= 1, got {dc['noise_draws']}")


def parse_args(argv):
    if not argv or "=" in argv[0]:
        raise SystemExit("usage: python SCRIPT.py config.yaml [section.key=value ...]")
    return load_config(argv[0], argv[1:])


# =============================================================================================
# Device and torchrun
# =============================================================================================

WAIT_TIMEOUT = datetime.timedelta(days=1)  # how long ranks wait while rank 0 fits the reward models
_wait_group = None                         # a gloo group with that timeout (NCCL's watchdog would
                                           # fire at 10 min)


def setup_distributed(cfg, single=None):
    """(rank, world_size, device). Under torchrun: NCCL on GPUs, gloo on CPUs; else one process
    (`single`: the script's name when it must run as one process). Says which device `device:
    auto` chose, and warns when a GPU is present but torch cannot use it."""
    global _wait_group
    want = cfg["device"]
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {want!r}")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device=cuda but torch {torch.__version__} sees no CUDA device"
                           + gpu_hint())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and single:
        raise SystemExit(f"{single} runs as one process (python {single} config.yaml): under "
                         f"torchrun every rank would repeat its work and write the same files")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo",
                                device_id=device if use_cuda else None)
        _wait_group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    if rank == 0 and want == "auto":
        log(rank, f"device: {device}" + ("" if use_cuda else gpu_hint())
            + f" ({world} process(es))")
    return rank, world, device


def gpu_hint():
    """A warning when the machine has an NVIDIA GPU that this torch cannot use (e.g. the CPU
    wheel)."""
    if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
        return ""
    return (f"; WARNING: this machine has an NVIDIA GPU, but torch {torch.__version__} (CUDA "
            f"{torch.version.cuda}) cannot use it: install the CUDA build of torch (README, GPUs)")


def rank0_first(world, rank, fn):
    """fn() on rank 0, then on the other ranks: rank 0 fits and caches (reward models, the
    corpus's latents), the others load what it wrote. They wait on a gloo group with a one-day
    timeout, so a long fit on rank 0 cannot trip the NCCL watchdog."""
    if world == 1:
        return fn()
    out = fn() if rank == 0 else None
    wait_for_rank0(world)
    return out if rank == 0 else fn()


def wait_for_rank0(world):
    """A barrier on the long-timeout gloo group (rank 0 may be busy for a long time)."""
    if world > 1:
        dist.barrier(group=_wait_group)


def rank_shard(n, rank, world):
    """The contiguous slice of n items that this rank handles (sizes differ by at most one; a
    rank may get none when n < world, and still joins every collective)."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


def gather(x, world):
    """Concatenate every rank's tensor along dim 0 (ranks hold rank_shard-sized pieces, maybe
    none)."""
    if world == 1:
        return x
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else x.device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: len(x)] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


def finish_distributed():
    """Tear the process group down at the end of a torchrun script. A DDP wrapper that is gone but
    not yet collected (its hooks form reference cycles) still holds the gloo group; freed only at
    interpreter exit, after the group's teardown, it aborted a rank in 10 of 220 two-process gloo
    runs ("terminate called without an active exception"; collected first: 0 of 250)."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def use_bf16(section, device):
    """A section's `bf16: true` means bf16 autocast on CUDA; on the CPU the config runs float32.
    (The functions below take the resolved flag, so tests can run the bf16 path on the CPU.)"""
    return bool(section["bf16"]) and torch.device(device).type == "cuda"


def autocast(device, enabled):
    """bf16 autocast on `device` when enabled, else a no-op (float32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def log(rank, *args):
    if rank == 0:
        tqdm.write(" ".join(str(a) for a in args))


# Noise seeds of held-out generations: prompt i gets the seed + i, the same for every model
TRAIN_EVAL_SEED = 10_000   # train.py's held-out checks (dragon.n_eval)
EVAL_SEED = 20_000         # eval.py's prompt sets (eval.evaluation_prompts), apart from train.py's


def seeded_generator(seed, step, rank=0):
    """A fresh torch.Generator per (seed, step, rank): every random draw of a training step comes
    from it, so there is no RNG state to save and a resumed run draws what the uninterrupted run
    drew. (DRAGON's rounds use rank 0 on every rank: all ranks draw the same global batch.)"""
    return torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))
