"""Row entropy of an attention block from the scores it was computed from, without a log per entry.

With p_j = exp(s_j) / Z (Z may include logits that are not keys, such as gpt-oss sinks),
-sum_j p_j ln p_j = ln Z * sum_j p_j - sum_j p_j s_j. In float32 both terms can be huge and
nearly cancel (scores of tens, masked scores at float32's minimum), so the scores are shifted by
their row maximum m first: s'_j = s_j - m <= 0, ln Z' = ln Z - m = -ln p_{j*} for the key j* that
holds the maximum. Then both terms are >= 0 and the sum has no cancellation.
"""

from __future__ import annotations

import torch


def entropy_from_scores(scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """`"... k"` scores (masked keys at -inf or float32's minimum) and the probabilities softmax gave
    them -> `"..."` entropy in nats, equal to -sum p ln p (0 ln 0 = 0).

    `probs` may sum to less than 1 when the softmax also normalised over logits outside `scores`.
    A row whose probabilities are all 0 (every key masked with -inf beside a sink) has entropy 0;
    a row softmax gave NaN stays NaN.
    """
    scores, probs = scores.float(), probs.float()
    top, peak = scores.max(-1, keepdim=True)
    top = torch.where(top.isfinite(), top, torch.zeros_like(top))
    shifted = torch.sub(scores, top).clamp_min_(torch.finfo(torch.float32).min)  # 0 x masked = 0, not NaN
    weighted = torch.linalg.vecdot(probs, shifted)  # sum_j p_j s'_j <= 0
    total = probs.sum(-1)
    log_z = probs.gather(-1, peak).squeeze(-1).log().neg_()  # ln Z' = -ln p_{j*}, as s'_{j*} = 0
    entropy = log_z * total - weighted
    return torch.where(total > 0, entropy, torch.where(total.isnan(), total, torch.zeros_like(total)))
