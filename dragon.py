"""DRAGON: the method itself. Read next to the paper's Eqs. (6)-(8) and Appendix F.

Online, on-policy demonstrations are scored by a reward; the reward splits them into a positive
set D+ and a negative set D-; the model is moved toward D+ and away from D- relative to a frozen
reference f_ref:
  Eq. (7)  A_theta(x) = e_theta(x) - e_ref(x)        per-example denoising error, same x0, sigma, n
  Eq. (6)  DPO on pairs:     L = -log sigmoid(-kappa beta (A_theta(x+) - A_theta(x-)))
  Eq. (8)  KTO on labels:    z = stopgrad(max(0, mean(-A_theta)));  L = mean w_s (1 - sigmoid(s beta (-A_theta - z)))
Lower error than the reference on x means higher likelihood of x, so both losses raise the
likelihood of D+ and lower that of D-. At theta = ref the DPO loss is ln 2: not a bug.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import loss_per_example


# =============================================================================================
# Eq. (7): A_theta, and the two losses on per-example error vectors
# =============================================================================================

def per_example_errors(model, ref_model, x0, text, mask, sigma, noise):
    """e_theta (with gradient) and e_ref (no gradient) on the same x0, sigma and noise [B]."""
    e_theta = loss_per_example(model, x0, text, mask, sigma, noise)
    with torch.no_grad():
        e_ref = loss_per_example(ref_model, x0, text, mask, sigma, noise)
    return e_theta, e_ref


def A_theta(e_theta, e_ref):
    """Eq. (7): how much better (negative) or worse f_theta denoises x than f_ref."""
    return e_theta - e_ref.detach()


def dpo_loss(e_theta_pos, e_ref_pos, e_theta_neg, e_ref_neg, beta, kappa=0.5, normalizer=None):
    """Eq. (6), Diffusion-DPO on pairs (x+, x-) that share sigma and noise; mean over pairs
    (or sum / normalizer when the caller averages over a global batch split across ranks)."""
    A_pos, A_neg = A_theta(e_theta_pos, e_ref_pos), A_theta(e_theta_neg, e_ref_neg)
    logits = -kappa * beta * (A_pos - A_neg)
    per_pair = -F.logsigmoid(logits)
    loss = per_pair.sum() / normalizer if normalizer else per_pair.mean()
    metrics = {
        "implicit_acc": ((A_pos < A_neg).float() + 0.5 * (A_pos == A_neg).float()).mean().item(),
        "saturated": (logits.detach().abs() > 5).float().mean().item(),   # sigmoid flat: weight ~0 or ~1
        "A_pos": A_pos.mean().item(), "A_neg": A_neg.mean().item(),
        "e_theta_pos": e_theta_pos.mean().item(), "e_ref_pos": e_ref_pos.mean().item(),
        "e_theta_neg": e_theta_neg.mean().item(), "e_ref_neg": e_ref_neg.mean().item(),
    }
    return loss, metrics


def kto_loss(e_theta, e_ref, is_positive, beta, w_pos=1.0, w_neg=1.0, normalizer=None):
    """Eq. (8), Diffusion-KTO on unpaired labels. The reference point z is the batch mean of
    -A_theta, clamped at 0 and detached; under DDP the mean is all-reduced over the global batch."""
    A = A_theta(e_theta, e_ref)
    total = torch.stack([(-A).detach().sum(), torch.tensor(float(len(A)), device=A.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    z = (total[0] / total[1]).clamp(min=0)
    s = torch.where(is_positive, 1.0, -1.0).to(A.dtype)
    w = torch.where(is_positive, w_pos, w_neg).to(A.dtype)
    logits = s * beta * (-A - z)
    per_example = w * (1 - torch.sigmoid(logits))
    loss = per_example.sum() / normalizer if normalizer else per_example.mean()
    pos, neg = is_positive, ~is_positive

    def mean(x, m):
        return x[m].mean().item() if m.any() else float("nan")
    metrics = {
        "implicit_acc": ((s * (-A - z)) > 0).float().mean().item(), "z": z.item(),
        "saturated": (logits.detach().abs() > 5).float().mean().item(),
        "A_pos": mean(A, pos), "A_neg": mean(A, neg),
        "e_theta_pos": mean(e_theta, pos), "e_ref_pos": mean(e_ref, pos),
        "e_theta_neg": mean(e_theta, neg), "e_ref_neg": mean(e_ref, neg),
    }
    return loss, metrics


# =============================================================================================
# Building D+ and D- for every reward type
# =============================================================================================

@dataclass
class Sets:
    """Indices into the batch of demonstrations. paired=True: pos[k] and neg[k] form pair k (they
    share sigma and noise in the loss); paired=False: two unpaired sets (KTO labels)."""
    pos: torch.Tensor
    neg: torch.Tensor
    paired: bool


def paired_sets(rewards, pairs):
    """Instance rewards, paired: of the two seeds of a prompt, the higher reward is positive.
    pairs [P, 2] indexes the two demonstrations of each prompt; exact ties are dropped."""
    r = torch.as_tensor(rewards)
    a, b = pairs[:, 0], pairs[:, 1]
    keep = r[a] != r[b]
    first_wins = r[a] > r[b]
    pos = torch.where(first_wins, a, b)[keep]
    neg = torch.where(first_wins, b, a)[keep]
    return Sets(pos, neg, paired=True)


def median_split(scores):
    """Instance rewards (or per-example scores), unpaired: the upper half of the batch is positive,
    the lower half negative (a split at the median; with an odd batch the median clip is left out)."""
    order = torch.argsort(torch.as_tensor(scores), descending=True, stable=True)
    half = len(order) // 2
    return Sets(order[:half], order[len(order) - half:], paired=False)


def greedy_swap(set_reward, pairs, generator=None):
    """Set rewards: D+ = first members of the pairs, D- = second (swapped whole if r(D-) > r(D+));
    then visit the pairs in random order and exchange a pair's members whenever that raises
    r(D+). set_reward(index tensor) -> float. Returns paired Sets."""
    pos, neg = pairs[:, 0].clone(), pairs[:, 1].clone()
    if set_reward(neg) > set_reward(pos):
        pos, neg = neg, pos
    best = set_reward(pos)
    for k in torch.randperm(len(pairs), generator=generator).tolist():
        trial = pos.clone()
        trial[k] = neg[k]
        value = set_reward(trial)
        if value > best:
            neg[k], pos[k], best = pos[k].clone(), neg[k].clone(), value
    return Sets(pos, neg, paired=True)


def leave_one_out(set_reward, n):
    """Set rewards, per-example contribution: r(S) - r(S without x) for each of the n examples."""
    everyone = torch.arange(n)
    full = set_reward(everyone)
    return torch.tensor([full - set_reward(everyone[everyone != i]) for i in range(n)], dtype=torch.float64)


def set_vs_set(set_reward, pairs):
    """Ablation: whole sets D1 and D2 compared once, no swapping; the better one is D+."""
    d1, d2 = pairs[:, 0], pairs[:, 1]
    return Sets(d1, d2, paired=True) if set_reward(d1) >= set_reward(d2) else Sets(d2, d1, paired=True)


def build_sets(method, pairs, rewards=None, set_reward=None, generator=None):
    """D+ / D- for the configured construction:
    instance rewards: 'paired' (per-prompt ranking) or 'unpaired' (median split);
    set rewards: 'greedy' (pair swapping), 'loo' (leave-one-out contributions, median split),
    'set_vs_set' (ablation)."""
    if method == "paired":
        return paired_sets(rewards, pairs)
    if method == "unpaired":
        return median_split(rewards)
    if method == "greedy":
        return greedy_swap(set_reward, pairs, generator)
    if method == "loo":
        return median_split(leave_one_out(set_reward, int(pairs.max()) + 1))
    if method == "set_vs_set":
        return set_vs_set(set_reward, pairs)
    raise ValueError(f"dragon.sets must be paired, unpaired, greedy, loo or set_vs_set, got {method!r}")


def pair_up(sets, generator=None):
    """DPO needs pairs: unpaired sets are paired at random (equal counts)."""
    if sets.paired:
        return sets
    k = min(len(sets.pos), len(sets.neg))
    return Sets(sets.pos[torch.randperm(len(sets.pos), generator=generator)[:k]],
                sets.neg[torch.randperm(len(sets.neg), generator=generator)[:k]], paired=True)


def rank_shard(n, rank, world):
    """The contiguous slice of n items that this rank handles (sizes differ by at most one)."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))
