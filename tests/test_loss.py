"""The perfect alignment loss against a hand computation."""

import math

import torch

from salm.loss import perfect_alignment_loss


def test_two_member_toy_by_hand():
    # one position: router logits (0, ln 3) -> pi = (1/4, 3/4); p_gold = (0.5, 0.1)
    router = torch.tensor([[0.0, math.log(3.0)]])
    gold = torch.log(torch.tensor([[0.5, 0.1]]))
    out = perfect_alignment_loss(router, gold, entropy_weight=0.2)
    mix = 0.25 * 0.5 + 0.75 * 0.1
    ent = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert math.isclose(out.nll.item(), -math.log(mix), rel_tol=1e-6)
    assert math.isclose(out.entropy.item(), ent, rel_tol=1e-6)
    assert math.isclose(out.loss.item(), -math.log(mix) - 0.2 * ent, rel_tol=1e-6)


def test_mask_excludes_positions_and_extreme_logprobs_stay_finite():
    router = torch.zeros(1, 3, 2)
    gold = torch.tensor([[[-1e4, -1e4], [math.log(0.5), math.log(0.5)], [-1.0, -2.0]]])
    mask = torch.tensor([[False, True, True]])
    out = perfect_alignment_loss(router, gold, mask, entropy_weight=0.0)
    expected = (math.log(2.0) - math.log(0.5 * math.exp(-1) + 0.5 * math.exp(-2))) / 2
    assert out.n_tokens == 2 and math.isclose(out.nll.item(), expected, rel_tol=1e-6)
    full = perfect_alignment_loss(router, gold, None, entropy_weight=0.0)
    assert torch.isfinite(full.nll) and full.nll.item() > 1000  # 1e4 nats at position 0, no log(0)


def test_gradient_moves_router_toward_better_member():
    router = torch.zeros(4, 2, requires_grad=True)
    gold = torch.log(torch.tensor([[0.9, 0.1]] * 4))
    perfect_alignment_loss(router, gold, entropy_weight=0.0).loss.backward()
    assert (router.grad[:, 0] < 0).all() and (router.grad[:, 1] > 0).all()
