import math

import pytest
import torch

from dragon import (A_theta, build_sets, dpo_loss, greedy_swap, kto_loss, kto_reference_point,
                    leave_one_out, median_split, pair_up, paired_sets, set_vs_set)
from rewards import vendi_score

sig = torch.sigmoid


# ---- Eq. (6) DPO ------------------------------------------------------------------------------

def dpo(e_theta_pos, e_ref_pos, e_theta_neg, e_ref_neg, beta, kappa=0.5):
    """Mean Eq. (6) loss over pairs, from the four error vectors."""
    per_pair, _ = dpo_loss(A_theta(e_theta_pos, e_ref_pos), A_theta(e_theta_neg, e_ref_neg),
                           beta, kappa)
    return per_pair.mean()


def test_dpo_is_ln2_when_theta_equals_ref():
    e = torch.tensor([0.3, 0.1, 0.7])
    per_pair, logits = dpo_loss(A_theta(e, e), A_theta(e * 2, e * 2), beta=5000)
    torch.testing.assert_close(per_pair, torch.full((3,), math.log(2)))
    assert (logits == 0).all()


def test_dpo_hand_value():
    # A+ = -0.001, A- = +0.001: -kappa beta (A+ - A-) = -0.5 * 5000 * (-0.002) = 5 -> log(1 + e^-5)
    per_pair, logits = dpo_loss(torch.tensor([-0.001]), torch.tensor([0.001]), beta=5000, kappa=0.5)
    assert per_pair.item() == pytest.approx(math.log1p(math.exp(-5)), rel=1e-4)
    assert logits.item() == pytest.approx(5.0, rel=1e-4)


def test_dpo_gradient_signs():
    e_pos = torch.tensor([0.2, 0.25], requires_grad=True)
    e_neg = torch.tensor([0.3, 0.22], requires_grad=True)
    dpo(e_pos, e_pos.detach(), e_neg, e_neg.detach(), beta=5000).backward()
    assert (e_pos.grad > 0).all()      # lowering the positive's error lowers the loss
    assert (e_neg.grad < 0).all()      # raising the negative's error lowers the loss
    # a positive with lower error than the reference lowers the loss below ln 2
    better = dpo(torch.tensor([0.199]), torch.tensor([0.2]), torch.tensor([0.3]),
                 torch.tensor([0.3]), 5000)
    assert better.item() < math.log(2)


def test_dpo_reference_error_gets_no_gradient():
    e_ref = torch.tensor([0.2], requires_grad=True)
    dpo(torch.tensor([0.1], requires_grad=True), e_ref, torch.tensor([0.3]), torch.tensor([0.3]),
        100).backward()
    assert e_ref.grad is None or (e_ref.grad == 0).all()


# ---- Eq. (8) KTO ------------------------------------------------------------------------------

def test_kto_hand_values_with_z_clamped_at_zero():
    A = torch.tensor([-0.002, 0.001, 0.0, 0.003])
    pos = torch.tensor([True, True, False, False])
    z = kto_reference_point(A)
    assert z.item() == 0.0                                     # mean(-A) = -0.0005 < 0 -> clamped
    per_example, _ = kto_loss(A, pos, beta=1000, z=z)
    expected = torch.stack([1 - sig(torch.tensor(2.0)), 1 - sig(torch.tensor(-1.0)),
                            torch.tensor(0.5), 1 - sig(torch.tensor(3.0))])
    torch.testing.assert_close(per_example, expected)


def test_kto_reference_point_and_its_stop_gradient():
    e_ref = torch.full((2,), 0.2)
    e_theta = (e_ref + torch.tensor([-0.004, -0.002])).requires_grad_(True)
    pos = torch.tensor([True, False])
    A = A_theta(e_theta, e_ref)
    z = kto_reference_point(A)
    assert z.item() == pytest.approx(0.003, rel=1e-4) and not z.requires_grad
    per_example, _ = kto_loss(A, pos, beta=1000, z=z, w_pos=1.0, w_neg=2.0)
    loss = per_example.mean()
    # by hand, z a constant: x+ : 1 - sig(1000 (0.004 - 0.003)) ;
    #                        x- : 2 (1 - sig(-1000 (0.002 - 0.003)))
    expected = ((1 - sig(torch.tensor(1.0))) + 2 * (1 - sig(torch.tensor(1.0)))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    loss.backward()
    s1 = sig(torch.tensor(1.0))
    # d/de_theta of w (1 - sig(s beta (-A - z))) with z constant = w s beta sig (1 - sig), over
    # the mean of 2
    torch.testing.assert_close(e_theta.grad,
                               torch.tensor([1000 * s1 * (1 - s1) / 2,
                                             -2 * 1000 * s1 * (1 - s1) / 2]),
                               rtol=1e-4, atol=1e-6)
    # positive: lower error; negative: raise it
    assert e_theta.grad[0] > 0 and e_theta.grad[1] < 0


def test_A_theta_detaches_the_reference():
    e_ref = torch.tensor([1.0], requires_grad=True)
    A_theta(torch.tensor([2.0], requires_grad=True), e_ref).sum().backward()
    assert e_ref.grad is None


# ---- set construction ---------------------------------------------------------------------------

def test_paired_sets_rank_each_prompt_and_drop_ties():
    r = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.5, 0.3])           # prompts k: examples k and k + 3
    pairs = torch.tensor([[0, 3], [1, 4], [2, 5]])
    s = paired_sets(r, pairs)
    assert s.paired and s.pos.tolist() == [3, 1, 2] and s.neg.tolist() == [0, 4, 5]
    tie = paired_sets(torch.tensor([0.4, 0.4, 0.1, 0.3]), torch.tensor([[0, 1], [2, 3]]))
    assert tie.pos.tolist() == [3] and tie.neg.tolist() == [2]


def test_median_split():
    s = median_split(torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7]))
    assert not s.paired
    assert sorted(s.pos.tolist()) == [2, 4] and sorted(s.neg.tolist()) == [1, 3]


def test_greedy_swapping_with_a_mean_reward_equals_per_pair_ranking():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(40, generator=g, dtype=torch.float64)
    pairs = torch.stack([torch.arange(20), torch.arange(20) + 20], 1)
    greedy = greedy_swap(lambda m: float(r[m].mean()), pairs, torch.Generator().manual_seed(1))
    ranked = paired_sets(r, pairs)
    assert (set(zip(greedy.pos.tolist(), greedy.neg.tolist()))
            == set(zip(ranked.pos.tolist(), ranked.neg.tolist())))


def test_greedy_swapping_with_vendi_makes_the_positive_set_more_diverse():
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(3, 16, generator=g)
    emb = torch.cat([protos[torch.randint(3, (20,), generator=g)]
                     + 0.05 * torch.randn(20, 16, generator=g),
                     torch.randn(20, 16, generator=g)])   # 20 near-duplicates, 20 diverse
    pairs = torch.randperm(40, generator=g).reshape(20, 2)
    vendi = lambda m: vendi_score(emb[m])                               # noqa: E731
    s = greedy_swap(vendi, pairs, g)
    assert vendi(s.pos) > vendi(s.neg)
    assert vendi(s.pos) >= max(vendi(pairs[:, 0]), vendi(pairs[:, 1]))


def test_leave_one_out_of_a_sum_is_each_reward():
    r = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(leave_one_out(lambda m: float(r[m].sum()), 4), r)
    s = build_sets("loo", torch.tensor([[0, 2], [1, 3]]), set_reward=lambda m: float(r[m].sum()))
    assert sorted(s.pos.tolist()) == [2, 3] and sorted(s.neg.tolist()) == [0, 1]


def test_set_vs_set_keeps_whole_sets():
    r = torch.tensor([1.0, 1.0, 0.0, 5.0])
    s = set_vs_set(lambda m: float(r[m].sum()), torch.tensor([[0, 2], [1, 3]]))
    assert s.pos.tolist() == [2, 3] and s.neg.tolist() == [0, 1]


def test_pair_up_and_bad_method():
    s = pair_up(median_split(torch.arange(7.0)), torch.Generator().manual_seed(0))
    assert s.paired and len(s.pos) == len(s.neg) == 3 and set(s.pos.tolist()) == {4, 5, 6}
    with pytest.raises(ValueError, match="dragon.sets must be paired, unpaired, greedy, loo or "
                                         "set_vs_set"):
        build_sets("best", torch.tensor([[0, 1]]), rewards=torch.tensor([1.0, 2.0]))
