"""DRAGON: the method itself. Read next to the paper's Eqs. (6)-(8) and Appendix F.

Online, on-policy demonstrations are scored by a reward; the reward splits them into a positive
set D+ and a negative set D-; the model is moved toward D+ and away from D- relative to a frozen
reference f_ref:
  Eq. (7)  A_theta(x) = e_theta(x) - e_ref(x)        per-example denoising error, same x0, sigma, n
  Eq. (6)  DPO on pairs:     L = -log sigmoid(-kappa beta (A_theta(x+) - A_theta(x-)))
  Eq. (8)  KTO on labels:    L = w_s (1 - sigmoid(s beta (-A_theta(x) - z))),
                             s = +1 on D+ and -1 on D-,  z = stopgrad(max(0, mean(-A_theta)))
Lower error than the reference on x means higher likelihood of x, so both losses raise the
likelihood of D+ and lower that of D-. At theta = ref the DPO loss is ln 2: not a bug.
The losses are per pair / per example; train.py averages them over the global batch.
"""
from dataclasses import dataclass

import torch
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


def dpo_loss(A_pos, A_neg, beta, kappa=0.5):
    """Eq. (6), Diffusion-DPO, per pair (x+, x-) that share sigma and noise:
    -log sigmoid(-kappa beta (A+ - A-)). Also returns the sigmoid's argument (|.| > 5:
    saturated)."""
    logits = -kappa * beta * (A_pos - A_neg)
    return -F.logsigmoid(logits), logits


def kto_reference_point(A):
    """Eq. (8)'s z = max(0, mean(-A_theta)) over the batch, detached (under DDP the caller takes the
    mean over the global batch)."""
    return (-A).detach().mean().clamp(min=0)


def kto_loss(A, is_positive, beta, z, w_pos=1.0, w_neg=1.0):
    """Eq. (8), Diffusion-KTO, per example: w (1 - sigmoid(s beta (-A_theta - z))), s = +1 on D+
    and -1 on D-. Also returns the sigmoid's argument."""
    s = torch.where(is_positive, 1.0, -1.0).to(A.dtype)
    w = torch.where(is_positive, w_pos, w_neg).to(A.dtype)
    logits = s * beta * (-A - z)
    return w * (1 - torch.sigmoid(logits)), logits


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
    the lower half negative (a split at the median; with an odd batch the median clip is left
    out)."""
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
    return torch.tensor([full - set_reward(everyone[everyone != i]) for i in range(n)],
                        dtype=torch.float64)


def set_vs_set(set_reward, pairs):
    """Ablation: whole sets D1 and D2 compared once, no swapping; the better one is D+."""
    d1, d2 = pairs[:, 0], pairs[:, 1]
    if set_reward(d1) >= set_reward(d2):
        return Sets(d1, d2, paired=True)
    return Sets(d2, d1, paired=True)


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
    raise ValueError(f"dragon.sets must be paired, unpaired, greedy, loo or set_vs_set, got "
                     f"{method!r}")


def pair_up(sets, generator=None):
    """DPO needs pairs: unpaired sets are paired at random (equal counts)."""
    if sets.paired:
        return sets
    k = min(len(sets.pos), len(sets.neg))
    return Sets(sets.pos[torch.randperm(len(sets.pos), generator=generator)[:k]],
                sets.neg[torch.randperm(len(sets.neg), generator=generator)[:k]], paired=True)
