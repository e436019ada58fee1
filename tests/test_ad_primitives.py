"""A&D's building blocks (methods.md 2.2, 2.3 step 7, 2.5) against hand computations: the forward noising
closed form, the DDIM sampler on a hand-computed two-step example with its clamping, the spaced timesteps,
the difficulty-aware weights on a scripted sequence of per-class Dice values, and the R&S pseudo-label
fusion on a fixed input (no gradient to either decoder)."""
import math

import pytest
import torch

from nnunet_semi.difficulty import DifficultyWeights, hard_batch_dice
from nnunet_semi.diffusion import (ddim_sample, encode_label, linear_alphas_cumprod, q_sample,
                                   spaced_timesteps)
from nnunet_semi.losses import gaussian_kernel, gaussian_smooth, reparameterize_and_smooth


def test_schedule_and_forward_noising_closed_form():
    abar = linear_alphas_cumprod()
    assert len(abar) == 1000
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    for t in (0, 1, 500, 999):
        assert abar[t].item() == pytest.approx(math.prod(1 - b for b in betas[:t + 1]), rel=1e-10)
    onehot = torch.nn.functional.one_hot(torch.tensor([[0, 2], [1, 1]]), 3).permute(2, 0, 1).unsqueeze(0)
    x0 = encode_label(onehot).repeat(2, 1, 1, 1)
    assert set(x0.unique().tolist()) == {-1.0, 1.0}
    eps = torch.randn_like(x0)
    t = torch.tensor([10, 900])
    xt = q_sample(x0, t, abar, eps)
    for b in range(2):
        a = abar[t[b]].item()
        torch.testing.assert_close(xt[b], math.sqrt(a) * x0[b] + math.sqrt(1 - a) * eps[b])


def test_spaced_timesteps_are_the_released_ten():
    assert spaced_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert spaced_timesteps(1000, 1) == [999] and spaced_timesteps(3, 2) == [0, 2]
    with pytest.raises(ValueError):
        spaced_timesteps(10, 11)


def test_ddim_two_steps_by_hand_and_clamping():
    abar = torch.tensor([0.9, 0.7, 0.4], dtype=torch.float64)   # timesteps 0, 1, 2; two spaced steps: 2 then 0
    calls = []

    def predict_x0(x, t):
        calls.append(int(t[0]))
        return 0.5 * x + 0.1 * t.float().reshape(-1, 1)

    x_T = torch.tensor([[0.8], [3.0]])
    out = ddim_sample(predict_x0, x_T.shape, abar, sample_steps=2, noise=x_T.clone(), clip=True)
    assert calls == [2, 0]
    for i, x in enumerate((0.8, 3.0)):
        # step t = 2: x0 = 0.5 x + 0.2 (clamped to [-1, 1]), eps from x_t, move to t = 0
        x0 = max(-1.0, min(1.0, 0.5 * x + 0.2))
        eps = (x - math.sqrt(0.4) * x0) / math.sqrt(1 - 0.4)
        x_prev = math.sqrt(0.9) * x0 + math.sqrt(1 - 0.9) * eps
        # step t = 0 (the last): the output is its clamped x0 prediction
        x0_last = max(-1.0, min(1.0, 0.5 * x_prev))
        assert out[i, 0].item() == pytest.approx(x0_last, rel=1e-6)
    # the second sample's first prediction (1.7) is clamped: without clamping the result differs
    calls.clear()
    unclamped = ddim_sample(predict_x0, x_T.shape, abar, sample_steps=2, noise=x_T.clone(), clip=False)
    assert unclamped[0, 0].item() == pytest.approx(out[0, 0].item()) and unclamped[1, 0].item() > 1.0


def test_difficulty_weights_follow_the_released_rule_on_a_scripted_sequence():
    seq = [[0.90, 0.20, 0.30], [0.92, 0.40, 0.25], [0.93, 0.60, 0.10], [0.95, 0.70, 0.05]]
    dw = DifficultyWeights(3)
    # the rule of methods.md 2.5, by hand in plain floats
    beta, prev, L, U, D = 0.98, [1e-8] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3
    for d in seq:
        w = dw.update_from_dice(torch.tensor(d, dtype=torch.float64))
        expected = []
        for c in range(3):
            delta, r = d[c] - prev[c], math.log(d[c] / prev[c])
            L[c] = beta * L[c] + (1 - beta) * max(delta, 0) * r
            U[c] = beta * U[c] + (1 - beta) * min(delta, 0) * r
            D[c] = beta * D[c] + (1 - beta) * (1 - d[c])
            expected.append(3 * ((U[c] + 1e-8) / (L[c] + 1e-8)) ** 0.2 * D[c])
            prev[c] = d[c]
        assert w.tolist() == pytest.approx(expected, rel=1e-9)
    # class 2 keeps getting worse (unlearning): the largest weight; class 0, easy and improving: the smallest
    assert w[2] > w[1] > w[0]
    state = dw.state_dict()
    again = DifficultyWeights(3)
    again.load_state_dict(state)
    assert again.update_from_dice(torch.tensor([0.9, 0.7, 0.1])).tolist() == \
        dw.update_from_dice(torch.tensor([0.9, 0.7, 0.1])).tolist()


def test_hard_batch_dice_includes_the_background():
    pred = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 0]])
    target = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 0]])
    d = hard_batch_dice(pred, target, 3)
    # class 0: tp 3, |p| 4, |y| 4; class 1: tp 2, |p| 2, |y| 3; class 2: tp 1, |p| 2, |y| 1
    assert d.tolist() == pytest.approx([6 / 8, 4 / 5, 2 / 3], rel=1e-6)


def test_gaussian_smoothing_kernel_and_same_size():
    k = gaussian_kernel(2)
    assert k.sum().item() == pytest.approx(1.0) and k[1, 1] == k.max()
    g = math.exp(-0.5)
    assert k[0, 1].item() == pytest.approx(g / (1 + 2 * g) ** 2 * 1, rel=1e-6)
    x = torch.zeros(1, 2, 5, 5)
    x[0, 1, 2, 2] = 1.0
    y = gaussian_smooth(x)
    assert y.shape == x.shape and torch.equal(y[0, 0], torch.zeros(5, 5))
    torch.testing.assert_close(y[0, 1, 1:4, 1:4], k)
    assert gaussian_smooth(torch.zeros(1, 3, 4, 4, 4)).shape == (1, 3, 4, 4, 4)


def test_rs_fusion_on_a_fixed_input_and_without_gradient():
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(2, 3, 6, 6, generator=g) * 2 - 1).requires_grad_(True)
    logits = torch.randn(2, 3, 6, 6, generator=g).requires_grad_(True)
    gumbel = -torch.log(-torch.log(torch.rand(2, 3, 6, 6, generator=g)))
    out = reparameterize_and_smooth(x0, logits, gumbel=gumbel)
    # direct computation
    soft = torch.softmax(x0.detach() + gumbel, 1)
    k = gaussian_kernel(2)
    smoothed = torch.nn.functional.conv2d(soft.reshape(6, 1, 6, 6), k[None, None], padding=1).reshape(2, 3, 6, 6)
    expected = (smoothed + torch.softmax(logits.detach(), 1)).argmax(1)
    assert torch.equal(out, expected) and out.shape == (2, 6, 6)
    assert not out.requires_grad and x0.grad is None and logits.grad is None
    # the smoothing matters: it is not the same as fusing without it (on this input)
    assert not torch.equal(out, (soft + torch.softmax(logits.detach(), 1)).argmax(1))
