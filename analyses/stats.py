"""The one statistics module: NaN-ignoring means, bootstrap intervals, permutation tests, multiple testing.

Every table that reports an interval or a p-value calls these: `compare_sets` (two prompt sets,
independent or paired), the atlas's head, layer and model tables (`Bootstrap.means`), the KV-group
tables (`group_gap`), and the research scripts in `experiments/`.

- `bootstrap_means`: column means of a prompts x columns array with a percentile bootstrap interval
  (prompts resampled with replacement, seeded); NaN entries are left out of every mean.
- `set_statistics` / `paired_statistics`: mean difference B - A with a bootstrap interval and a
  two-sided permutation p-value (labels shuffled, or signs of pair differences flipped; exact
  enumeration when there are at most `n_permutations` relabellings).
- `group_gap`: within-group minus between-group mean of a head x head similarity, one-sided p-value
  from shuffling the heads' group labels (per layer for a stack of layers).
- `unit_means`: NaN-ignoring mean of units (heads) over groups (layers, or the whole model).
- `bh_adjust`: Benjamini-Hochberg adjusted p-values.

Resampling is vectorised: each resample or permutation is a row of a weight matrix, so every column is
averaged by one matrix product, in column blocks that bound the temporaries.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np

from llm_heatmap.analyses.bounds import check_statistics
from llm_heatmap.errors import InputError


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: `n_resamples` resamples of the prompts, central `confidence`, `seed`."""

    n_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def means(self, x: np.ndarray) -> dict:
        return bootstrap_means(x, n_resamples=self.n_resamples, confidence=self.confidence, seed=self.seed)


def weighted_means(weights: np.ndarray, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rows of `weights` ("r n") average the rows of `values` ("n k"), ignoring NaN entries."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ values) / (weights @ valid)


def column_blocks(columns: int, rows: int, budget: int = 1 << 24):
    """Column slices whose "rows x block" float64 temporaries stay near `budget` elements (128 MiB)."""
    step = max(1, budget // max(1, rows))
    return [slice(start, min(columns, start + step)) for start in range(0, columns, step)]


def bh_adjust(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN entries stay NaN and are not counted)."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    finite = np.isfinite(p)
    values = p[finite]
    if values.size:
        order = np.argsort(values)
        ranked = values[order] * values.size / np.arange(1, values.size + 1)
        ranked = np.minimum.accumulate(ranked[::-1])[::-1]
        adjusted = np.empty_like(values)
        adjusted[order] = np.minimum(ranked, 1.0)
        out[finite] = adjusted
    return out


def resample_counts(rng: np.random.Generator, n: int, n_resamples: int) -> np.ndarray:
    """`"r n"`: how often each of n prompts is drawn in each bootstrap resample (n draws with replacement)."""
    return rng.multinomial(n, np.full(n, 1 / n), size=n_resamples).astype(float)


def percentile_interval(boot: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """The central `confidence` percentile interval of each column of `boot` (`"resample column"`)."""
    tail = (1 - confidence) / 2 * 100
    low, high = np.full(boot.shape[1:], np.nan), np.full(boot.shape[1:], np.nan)
    complete = ~np.isnan(boot).any(0)
    # np.percentile on the columns without NaN: nanpercentile takes a slow per-column path on the whole array
    low[complete], high[complete] = np.percentile(boot[:, complete], [tail, 100 - tail], axis=0)
    if not complete.all():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (a metric undefined everywhere)
            low[~complete], high[~complete] = np.nanpercentile(boot[:, ~complete], [tail, 100 - tail], axis=0)
    return low, high


def mean_and_interval(counts: np.ndarray, zero: np.ndarray, valid: np.ndarray, confidence: float) -> dict:
    """NaN-ignoring column means of `zero` (NaN replaced by 0, `valid` marks real entries) and their bootstrap
    interval under the resamples `counts`, in column blocks that bound the temporaries."""
    n, columns = zero.shape
    mean = weighted_means(np.ones((1, n)), zero, valid)[0]
    low, high = np.full(columns, np.nan), np.full(columns, np.nan)
    for block in column_blocks(columns, len(counts)):
        low[block], high[block] = percentile_interval(weighted_means(counts, zero[:, block], valid[:, block]), confidence)
    return {"n": valid.sum(0), "mean": mean, "ci_low": low, "ci_high": high}


def bootstrap_means(x: np.ndarray, *, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of every column of `x` (`"n k"`: rows are prompts; NaN entries left out) with a percentile
    bootstrap interval (prompts resampled with replacement, `n_resamples` times, seeded).

    Returns arrays of length k: n (non-NaN rows), mean, ci_low, ci_high.
    """
    check_statistics(n_resamples=n_resamples, confidence=confidence, seed=seed)
    x = np.asarray(x, float)
    if x.ndim != 2 or len(x) < 1:
        raise InputError(f"bootstrap_means needs a prompts x columns array with at least one prompt, got shape {x.shape}.")
    rng = np.random.default_rng(seed)
    return mean_and_interval(resample_counts(rng, len(x), n_resamples), np.nan_to_num(x), ~np.isnan(x), confidence)


def set_statistics(x_a: np.ndarray, x_b: np.ndarray, *, n_resamples: int = 2000, n_permutations: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> dict[str, np.ndarray]:
    """Mean difference B - A of every column with a bootstrap interval and a permutation p-value.

    `x_a` is `"n_a k"`, `x_b` is `"n_b k"` (rows are prompts, columns are whatever is compared);
    NaN entries are left out of every mean. Returns arrays of length k: n_a, n_b, mean_a,
    mean_b, delta, ci_low, ci_high, p_value.
    """
    check_statistics(n_resamples=n_resamples, n_permutations=n_permutations, confidence=confidence, seed=seed)
    x_a, x_b = np.asarray(x_a, float), np.asarray(x_b, float)
    n_a, n_b = len(x_a), len(x_b)
    if n_a < 1 or n_b < 1:
        raise InputError(f"each prompt set needs at least one prompt (got {n_a} and {n_b}); add prompts to the empty set.")
    rng = np.random.default_rng(seed)
    valid_a, valid_b = ~np.isnan(x_a), ~np.isnan(x_b)
    zero_a, zero_b = np.nan_to_num(x_a), np.nan_to_num(x_b)
    mean_a = weighted_means(np.ones((1, n_a)), zero_a, valid_a)[0]
    mean_b = weighted_means(np.ones((1, n_b)), zero_b, valid_b)[0]
    delta = mean_b - mean_a

    # bootstrap: resample counts of each prompt, one row per resample
    counts_a = resample_counts(rng, n_a, n_resamples)
    counts_b = resample_counts(rng, n_b, n_resamples)
    # permutation: which pooled prompts are labelled A, one row per relabelling
    n = n_a + n_b
    exact = math.comb(n, n_a) <= n_permutations
    if exact:
        labels_a = np.zeros((math.comb(n, n_a), n))
        for row, members in enumerate(itertools.combinations(range(n), n_a)):
            labels_a[row, list(members)] = 1
    else:
        order = rng.permuted(np.tile(np.arange(n), (n_permutations, 1)), axis=1)
        labels_a = np.zeros((n_permutations, n))
        np.put_along_axis(labels_a, order[:, :n_a], 1.0, axis=1)
    pooled, pooled_valid = np.vstack([zero_a, zero_b]), np.vstack([valid_a, valid_b])

    ci_low, ci_high, p_value = (np.full(delta.shape, np.nan) for _ in range(3))
    for block in column_blocks(delta.size, max(n_resamples, len(labels_a))):
        boot = weighted_means(counts_b, zero_b[:, block], valid_b[:, block]) - weighted_means(
            counts_a, zero_a[:, block], valid_a[:, block])
        ci_low[block], ci_high[block] = percentile_interval(boot, confidence)
        permuted = (weighted_means(1 - labels_a, pooled[:, block], pooled_valid[:, block])
                    - weighted_means(labels_a, pooled[:, block], pooled_valid[:, block]))
        # a relative tolerance so that splits equal to the observed one count despite rounding
        extreme = (np.abs(permuted) >= np.abs(delta[block]) * (1 - 1e-9) - 1e-12) & np.isfinite(permuted)
        total = np.isfinite(permuted).sum(0)
        p_value[block] = extreme.sum(0) / total.clip(min=1) if exact else (1 + extreme.sum(0)) / (1 + total)
    p_value = np.where(np.isfinite(delta), p_value, np.nan)
    return {"n_a": valid_a.sum(0), "n_b": valid_b.sum(0), "mean_a": mean_a, "mean_b": mean_b, "delta": delta,
            "ci_low": ci_low, "ci_high": ci_high, "p_value": p_value}


def paired_statistics(x_a: np.ndarray, x_b: np.ndarray, *, n_resamples: int = 2000, n_permutations: int = 2000,
                      confidence: float = 0.95, seed: int = 0) -> dict[str, np.ndarray]:
    """Like `set_statistics` for matched pairs: row i of `x_a` and of `x_b` belong together.

    delta = mean over pairs of (b_i - a_i); the bootstrap resamples pairs; the permutation test
    flips the sign of each pair's difference (swapping the two labels inside a pair), exactly
    over all 2^n flips when that is at most `n_permutations`. Pairs with a NaN are left out.
    """
    check_statistics(n_resamples=n_resamples, n_permutations=n_permutations, confidence=confidence, seed=seed)
    x_a, x_b = np.asarray(x_a, float), np.asarray(x_b, float)
    if x_a.shape != x_b.shape or len(x_a) < 1:
        raise InputError(f"paired comparison needs the same number of prompts on both sides (got {len(x_a)} and {len(x_b)}).")
    rng = np.random.default_rng(seed)
    diff = x_b - x_a
    valid = ~np.isnan(diff)
    zero = np.nan_to_num(diff)
    n = len(diff)
    bootstrap = mean_and_interval(resample_counts(rng, n, n_resamples), zero, valid, confidence)
    delta, ci_low, ci_high = bootstrap["mean"], bootstrap["ci_low"], bootstrap["ci_high"]
    exact = 2 ** n <= n_permutations
    if exact:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1).astype(float)
    else:
        signs = rng.choice([-1.0, 1.0], size=(n_permutations, n))
    with np.errstate(invalid="ignore", divide="ignore"):
        flipped = (signs @ zero) / valid.sum(0)
    extreme = (np.abs(flipped) >= np.abs(delta) * (1 - 1e-9) - 1e-12) & np.isfinite(flipped)
    total = np.isfinite(flipped).sum(0)
    p_value = extreme.sum(0) / total.clip(min=1) if exact else (1 + extreme.sum(0)) / (1 + total)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_a = np.nansum(np.where(valid, x_a, 0), 0) / valid.sum(0)
        mean_b = np.nansum(np.where(valid, x_b, 0), 0) / valid.sum(0)
    return {"n_a": valid.sum(0), "n_b": valid.sum(0), "mean_a": mean_a, "mean_b": mean_b, "delta": delta,
            "ci_low": ci_low, "ci_high": ci_high, "p_value": np.where(np.isfinite(delta), p_value, np.nan)}


def unit_means(x: np.ndarray, group_of_unit: np.ndarray, count: int) -> np.ndarray:
    """`"prompt unit column" -> "prompt group column"`: NaN-ignoring mean over each group's units (a layer's
    heads, or every head with one group)."""
    one_hot = np.eye(count)[group_of_unit]
    valid = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.einsum("num,ul->nlm", np.nan_to_num(x), one_hot) / np.einsum("num,ul->nlm", valid.astype(float), one_hot)


def group_means(similarity, same_group):
    """(within, between): mean of `similarity` (`"... h h"`) over head pairs a < b in the same group and
    in different groups, `same_group` a bool `"... h h"` (leading axes broadcast: prompts, permutations)."""
    import torch

    heads = similarity.shape[-1]
    upper = torch.ones(heads, heads, dtype=torch.bool).triu(1)
    inside = (same_group & upper).double()
    outside = (~same_group & upper).double()
    within = (similarity * inside).sum((-1, -2)) / inside.sum((-1, -2))
    between = (similarity * outside).sum((-1, -2)) / outside.sum((-1, -2))
    return within, between


def groups_comparable(groups) -> bool:
    """Whether a grouping of heads (one label per head) has a pair of heads in one group and a pair in two,
    which a within-minus-between gap needs."""
    import torch

    groups = torch.as_tensor(groups)
    upper = torch.ones(len(groups), len(groups), dtype=torch.bool).triu(1)
    same = groups[:, None] == groups[None, :]
    return bool((same & upper).any() and (~same & upper).any())


def group_gap(similarity, groups, n_permutations: int = 1000, seed: int = 0) -> dict:
    """within, between, gap = within - between and a one-sided permutation p-value of a head x head
    similarity `"h h"` under the grouping `groups` (one label per head): the share of `n_permutations`
    shuffles of the labels whose gap is at least the observed one, `(1 + #) / (1 + n_permutations)`.

    For a stack of layers `"l h h"` every number is the mean over the layers, and each shuffle
    relabels the heads of every layer independently."""
    import torch

    check_statistics(n_permutations=n_permutations, seed=seed)
    groups = torch.as_tensor(groups)
    heads = len(groups)
    same = groups[:, None] == groups[None, :]
    if not groups_comparable(groups):
        raise InputError("the KV-group statistic needs at least one pair of heads in the same group and one in different groups; "
                         "pass more heads or another pseudo_group_size.")
    layers = similarity if similarity.dim() == 3 else similarity[None]  # l h h
    within, between = group_means(layers, same)
    gap = (within - between).mean()
    generator = torch.Generator().manual_seed(seed)
    order = torch.rand(n_permutations, len(layers), heads, generator=generator).argsort(-1)
    shuffled = groups[order]  # p l h
    perm_within, perm_between = group_means(layers, shuffled[..., :, None] == shuffled[..., None, :])
    exceed = int(((perm_within - perm_between).mean(-1) >= gap - 1e-12).sum())
    return {"within": float(within.mean()), "between": float(between.mean()), "gap": float(gap),
            "p_value": (1 + exceed) / (1 + n_permutations)}
