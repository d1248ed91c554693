"""p ln p of an attention block, from the scores its softmax read, without a log per entry.

With p_j = exp(s_j) / Z (Z may include logits that are not keys, such as gpt-oss sinks) and m the
row's largest score, at key j*: ln p_j = s_j - ln Z and ln p_{j*} = m - ln Z, so

    p_j ln p_j = p_j (s_j - m) + p_j ln p_{j*}.

The capture has the scores in hand (`KernelCall.entropy_terms`): a row maximum, a subtraction and
a product give the first term for every entry, and p_{j*} is the row's largest weight, which the
metrics need anyway. Both terms are <= 0, so their sum has no cancellation in float32 (the unshifted
ln Z sum p - sum p s would subtract two numbers of the size of the scores). A score of -inf (a
model's own additive mask) makes its product NaN (0 x -inf): `entropy` is then not finite and the
caller falls back to the log per entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EntropyTerms:
    """One block's `shifted` = p_j (s_j - max_k s_k) (`"... k"`) and each row's largest weight `peak` (`"..."`)."""

    shifted: torch.Tensor
    peak: torch.Tensor

    @classmethod
    def from_scores(cls, scores: torch.Tensor, probs: torch.Tensor) -> "EntropyTerms":
        """`scores`: what the softmax that gave `probs` read (`"... k"`, fp32); overwritten with the products."""
        # the largest weight is the one at the largest score (two row maxima: a third of the time of one
        # maximum with its index)
        peak = probs.amax(-1)
        return cls(shifted=scores.sub_(scores.amax(-1, keepdim=True)).mul_(probs), peak=peak)

    def select(self, dim: int, index: torch.Tensor) -> "EntropyTerms":
        """The terms of some heads or rows (`dim` counted on `shifted`; `peak` lacks its last axis)."""
        return EntropyTerms(self.shifted.index_select(dim, index), self.peak.index_select(dim, index))

    def log_peak_times(self, mass: torch.Tensor) -> torch.Tensor:
        """ln p_{j*} x `mass` (`"..."` or `"... c"`: sums of p_j, or of p_j times key columns, over the keys)."""
        log_peak = self.peak.log()
        return log_peak * mass if mass.ndim == log_peak.ndim else log_peak[..., None] * mass

    def entropy(self, total: torch.Tensor) -> torch.Tensor:
        """`"..."`: -sum_j p_j ln p_j (0 ln 0 = 0), given `total` = sum_j p_j of each row."""
        return -(self.shifted.sum(-1) + self.log_peak_times(total))
