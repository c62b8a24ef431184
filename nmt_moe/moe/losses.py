"""Balancing losses for MoE routers, unweighted: the layer multiplies each by its configured weight.

All functions take fp32 tensors and return fp32 scalars (or per-expert vectors for the load estimates).
Losses that average over tokens are split into a sum over tokens (computed by the gate, and added up over
ranks under expert parallelism) and the division by the token count (done on the global sums).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, population variance / mean².

    The variance is computed directly rather than through `std`, whose gradient is NaN at perfect balance.
    """
    values = values.float().reshape(-1)
    if values.numel() <= 1:
        return values.new_zeros(())
    mean = values.mean()
    variance = (values - mean).pow(2).mean()
    return variance / (mean.pow(2) + eps)


def prob_in_top_k(clean: Tensor, noisy: Tensor, noise_std: Tensor, selected: Tensor, k: int) -> Tensor:
    """Shazeer et al. (2017) eq. 8-9: probability that each expert is in the top k under fresh noise.

    P(x, i) = Φ((clean_i − kth_excluding(noisy, k, i)) / σ_i). The k-th largest noisy score *excluding i* is
    the (k+1)-th largest overall for an expert inside the top k, and the k-th largest for one outside.
    All inputs are [..., E] over the last dimension (the experts competing with each other); `selected` is the
    bool top-k mask. Returns [..., E] probabilities, differentiable w.r.t. `clean` and `noise_std`.
    """
    num_experts = noisy.shape[-1]
    if k >= num_experts:  # every expert is always selected: the estimate is exactly one
        return torch.ones_like(clean)
    top = noisy.topk(k + 1, dim=-1).values  # [..., k+1]
    threshold_if_in = top[..., k : k + 1]  # (k+1)-th largest
    threshold_if_out = top[..., k - 1 : k]  # k-th largest
    threshold = torch.where(selected, threshold_if_in, threshold_if_out)  # [..., E]
    return torch.special.ndtr((clean - threshold) / noise_std)  # Φ; Normal.cdf would validate on the host


def switch_balance_loss(prob_sum: Tensor, load: Tensor, num_tokens: Tensor, k: int) -> Tensor:
    """Switch Transformer balance loss: num_experts · Σ_i fraction_routed_i · mean_prob_i.

    Built from sums over the batch so that expert parallelism can add them up over ranks first:
    `prob_sum` [E] router probabilities summed over the tokens (rows of probabilities sum to one), `load` [E]
    assignments per expert, `num_tokens` scalar. The fraction is over the N·k assignments, so perfect
    balance gives exactly 1 for any k.
    """
    num_experts = prob_sum.shape[-1]
    tokens = num_tokens.clamp(min=1)
    fraction = load.float() / (tokens * k)  # [E], no gradient (hard counts)
    mean_prob = prob_sum / tokens  # [E]
    return num_experts * (fraction * mean_prob).sum()


def router_z_sum(logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """Σ over the (valid [N]) tokens of logsumexp(logits)²: the ST-MoE router z-loss (which keeps router
    logits small) is this sum divided by the number of tokens."""
    z = torch.logsumexp(logits, dim=-1).pow(2)  # [N]
    return z.sum() if valid is None else (z * valid).sum()


def batchwise_threshold_sum(
    scores: Tensor, threshold: Tensor, batch_mask: Tensor, valid: Tensor | None = None
) -> Tensor:
    """Shazeer et al. (2017) appendix F: trains per-expert thresholds to mimic the batchwise mask.

    Σ_x Σ_i (M_threshold(x)_i − M_batchwise(X)_{x,i}) · (x_i − T_i), summed over tokens and experts as in the
    paper; the gate divides it by the (global) number of tokens, which keeps the weight independent of the
    batch size. `scores` [N, E], `threshold` [E], `batch_mask` [N, E] bool, `valid` [N] bool real tokens.
    """
    threshold_mask = scores > threshold
    if valid is not None:
        threshold_mask = threshold_mask & valid.unsqueeze(1)
    threshold_mask = threshold_mask.float()
    disagreement = threshold_mask - batch_mask.float()  # [N, E] in {-1, 0, 1}
    return (disagreement * (scores - threshold)).sum()


def softplus_noise_std(noise_logits: Tensor, epsilon: float) -> Tensor:
    """The paper's noise scale, softplus(x W_noise) + ε (the load estimate divides by it)."""
    return F.softplus(noise_logits) + epsilon
