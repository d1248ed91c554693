"""p ln p of an attention block, from the scores its softmax read, without a log per entry.

With p_j = exp(s_j) / Z (Z may include logits that are not keys, such as gpt-oss sinks) and m the
row's largest score, at key j*: ln p_j = s_j - ln Z and ln p_{j*} = m - ln Z, so

    sum_j p_j ln p_j c_j = sum_j p_j (s_j - m) c_j + ln p_{j*} sum_j p_j c_j

for any key column c. The capture has the scores in hand: it keeps the first sum for c = 1 and, where it
records value norms, for c = the head's value norms (`sums`, `"... c"`), and p_{j*}, the row's largest
weight (`peak`), which the metrics need anyway; the second sum is the consumer's. Both terms are <= 0,
so their sum has no cancellation in float32 (the unshifted ln Z sum p - sum p s would subtract two
numbers of the size of the scores). A score of -inf (a model's own additive mask) makes its product
NaN (0 x -inf): the sums are then not finite and the caller falls back to the log per entry.

`native_softmax` computes the terms with the softmax, in the same pass; `from_scores` is the same in
torch, for the blocks it does not take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EntropyTerms:
    """One block's `sums` = sum_j p_j (s_j - max_k s_k) [and that times the value norms] (`"... c"`) and
    each row's largest weight `peak` (`"..."`)."""

    sums: torch.Tensor
    peak: torch.Tensor

    @classmethod
    def from_scores(cls, scores: torch.Tensor, probs: torch.Tensor, key_weights: torch.Tensor | None = None
                    ) -> "EntropyTerms":
        """`scores`: what the softmax that gave `probs` read (`"... h q k"`, fp32; overwritten); `key_weights`:
        `"h k"`, the value norms of a second column of sums."""
        # the largest weight is the one at the largest score (two row maxima: a third of the time of one
        # maximum with its index)
        peak = probs.amax(-1)
        shifted = scores.sub_(scores.amax(-1, keepdim=True)).mul_(probs)
        sums = shifted.sum(-1, keepdim=True)
        if key_weights is not None:
            weights = key_weights.to(shifted.device, shifted.dtype)[:, :shifted.shape[-1], None]  # "h k 1"
            sums = torch.cat([sums, torch.matmul(shifted, weights)], -1)
        return cls(sums=sums, peak=peak)

    def select(self, dim: int, index: torch.Tensor) -> "EntropyTerms":
        """The terms of some heads or rows (`dim` counted from the front)."""
        return EntropyTerms(self.sums.index_select(dim, index), self.peak.index_select(dim, index))

    def plogp_sums(self, masses: torch.Tensor) -> torch.Tensor:
        """`"... c"`: sum_j p_j ln p_j c_j for the key columns of `sums`, given `masses` = sum_j p_j c_j (`"... c"`)."""
        return self.sums[..., :masses.shape[-1]] + self.peak.log()[..., None] * masses

    def entropy(self, total: torch.Tensor) -> torch.Tensor:
        """`"..."`: -sum_j p_j ln p_j (0 ln 0 = 0), given `total` = sum_j p_j of each row."""
        return -self.plogp_sums(total[..., None])[..., 0]
