"""Per-head metrics and KV-group similarity of a full SmolLM2 cube: vectorised vs naive per-head loops.

    /work/venv/bin/python benchmarks/bench_metrics.py [--tokens 512] [--permutations 1000]

The cube comes from eager `output_attentions` (30 layers x 9 heads x T x T). Baselines,
measured in the same run on the same cube, compute the same numbers (asserted):

- head_metrics, float64 reference: the dense implementation `head_metrics` had before its fast path
  (tests/metrics_reference.py), every column to 1e-5 + 1e-5 relative, as in the tests;

- head_metrics, naive: a Python loop over layers, heads and query rows in numpy, each metric
  written out from its definition (how a first script would do it);
- head_metrics, per-head loop: the library's own reducer called once per head (vectorised
  over rows only), which isolates the gain of vectorising over heads;
- kv_group_similarity, per-pair loop: the same similarities computed one head pair at a time
  (rows vectorised), then the same permutation test.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from llm_heatmap.analyses import head_metrics, is_special_token, kv_group_similarity, segment_ids  # noqa: E402
from llm_heatmap.analyses.heads.head_detector import detection_patterns  # noqa: E402
from llm_heatmap.analyses.similarity.kv_similarity import group_gap, head_groups  # noqa: E402
from llm_heatmap.analyses.heads.patterns import classify_heads  # noqa: E402
from llm_heatmap.models import load_model  # noqa: E402
from llm_heatmap.probes import AttentionCube  # noqa: E402
from metrics_reference import reference_head_metrics  # noqa: E402

TEXT = ("Attention heads in a small language model divide the work of reading a prompt. Some look back one "
        "token, some park their weight on the first token, and some copy what followed an earlier occurrence "
        "of the current token. Grouped-query attention shares one key and value projection among several query "
        "heads; whether those heads then attend alike is an empirical question. ")


def smollm2_cube(tokens: int) -> AttentionCube:
    model, tokenizer, spec = load_model("smollm2-135m", attn_implementation="eager")
    ids = tokenizer(TEXT * (tokens // 40 + 2), return_tensors="pt")["input_ids"][:, :tokens]
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    return AttentionCube.from_pattern(torch.stack(out.attentions, 1)[0].float(), spec, ids[0],
                                      tokenizer.convert_ids_to_tokens(ids[0]))


def naive_head_metrics(cube: AttentionCube) -> pd.DataFrame:
    """Every metric from its definition, one layer, head and row at a time (numpy)."""
    pattern = cube.pattern.double().numpy()
    allowed = cube.attendable().numpy()
    positions = cube.query_positions.numpy()
    special = np.array([is_special_token(t) for t in cube.tokens])
    segments = segment_ids(cube.tokens).numpy()
    detection = detection_patterns(cube.token_ids).double().numpy()
    records = []
    for li, layer in enumerate(cube.layers):
        for hi, head in enumerate(cube.heads):
            sums = dict.fromkeys(["entropy", "norm_entropy", "effective_keys", "effective_keys_frac", "max_weight",
                                  "prev_token_mass", "current_token_mass", "next_token_mass", "mean_distance",
                                  "distance_ratio", "special_mass", "local_mass"], 0.0)
            local_uniform = block = block_uniform = 0.0
            sink, sink_rows = [0.0, 0.0], [0, 0]
            column = np.zeros(cube.num_keys)
            column_rows = np.zeros(cube.num_keys)
            column_uniform = np.zeros(cube.num_keys)
            rows = 0
            for r, pos in enumerate(positions):
                keys = np.flatnonzero(allowed[li, r])
                weights = pattern[li, hi, r, keys]
                if 0 in keys:
                    sink[0] += pattern[li, hi, r, 0]
                    sink_rows[0] += 1
                    if pos != 0:
                        sink[1] += pattern[li, hi, r, 0]
                        sink_rows[1] += 1
                n = len(keys)
                if n < 2:
                    continue
                rows += 1
                entropy = -np.sum(weights[weights > 0] * np.log(weights[weights > 0]))
                sums["entropy"] += entropy
                sums["norm_entropy"] += entropy / math.log(n)
                sums["effective_keys"] += math.exp(entropy)
                sums["effective_keys_frac"] += math.exp(entropy) / n
                sums["max_weight"] += weights.max()
                for name, offset in (("prev_token_mass", -1), ("current_token_mass", 0), ("next_token_mass", 1)):
                    hit = keys == pos + offset
                    sums[name] += weights[hit].sum()
                dist = np.abs(pos - keys)
                sums["mean_distance"] += (weights * dist).sum()
                sums["distance_ratio"] += (weights * dist).sum() / dist.mean()
                sums["special_mass"] += weights[special[keys]].sum()
                sums["local_mass"] += weights[dist <= 1].sum()
                local_uniform += (dist <= 1).mean()
                same = segments[keys] == segments[pos]
                block += weights[same].sum()
                block_uniform += same.mean()
                column[keys] += weights
                column_rows[keys] += 1
                column_uniform[keys] += 1 / n
            record = {"layer": layer, "head": head, "kv_group": cube.spec.kv_group(head)}
            record.update({k: v / rows for k, v in sums.items()})
            record["sink_score"] = sink[0] / sink_rows[0]
            record["sink_score_no_q0"] = sink[1] / sink_rows[1]
            record["diagonal_score"] = record["local_mass"] - local_uniform / rows
            record["block_score"] = (block - block_uniform) / rows
            lift = np.where(column_rows >= 0.5 * column_rows.max(), (column - column_uniform) / np.maximum(column_rows, 1), -np.inf)
            record["vertical_score"] = lift.max()
            full = pattern[li, hi]
            for d, name in enumerate(("previous_token_score", "duplicate_token_score", "induction_score")):
                record[name] = (full * detection[d]).sum() / full.sum()
            records.append(record)
    table = pd.DataFrame.from_records(records)
    table["pattern_class"] = classify_heads(table)
    return table


def per_head_loop(cube: AttentionCube) -> pd.DataFrame:
    tables = [head_metrics(cube.select(heads=[head])) for head in cube.heads]
    return pd.concat(tables).sort_values(["layer", "head"]).reset_index(drop=True)


def naive_kv_similarity(cube: AttentionCube, n_permutations: int) -> pd.DataFrame:
    """The similarities of `kv_group_similarity`, one head pair at a time (rows vectorised)."""
    groups, grouping = head_groups(cube)
    allowed = cube.attendable()
    records = []
    for li, layer in enumerate(cube.layers):
        for first_token in ("kept", "dropped"):
            mask = allowed[li].clone()
            if first_token == "dropped":
                mask[:, 0] = False
            spread = mask.sum(-1) >= 2
            heads = cube.num_heads
            matrices = {m: torch.eye(heads, dtype=torch.float64) for m in ("js", "cosine", "pearson")}
            for a in range(heads):
                for b in range(a + 1, heads):
                    pa, pb = cube.pattern[li, a].double() * mask, cube.pattern[li, b].double() * mask
                    p = pa[spread] / pa[spread].sum(-1, keepdim=True)
                    q = pb[spread] / pb[spread].sum(-1, keepdim=True)
                    m = (p + q) / 2
                    js = -torch.special.xlogy(m, m).sum(-1) + (torch.special.xlogy(p, p).sum(-1)
                                                               + torch.special.xlogy(q, q).sum(-1)) / 2
                    matrices["js"][a, b] = 1 - js.clamp(min=0).mean() / math.log(2)
                    entries = mask & spread[:, None]
                    va, vb = pa[entries], pb[entries]
                    matrices["cosine"][a, b] = (va @ vb) / (va.norm() * vb.norm())
                    ca, cb = va - va.mean(), vb - vb.mean()
                    matrices["pearson"][a, b] = (ca @ cb) / (ca.norm() * cb.norm())
            for measure, s in matrices.items():
                s = s.triu(1) + s.triu(1).T + torch.eye(heads, dtype=torch.float64)
                records.append({"layer": layer, "measure": measure, "first_token": first_token, "grouping": grouping,
                                **group_gap(s, groups, n_permutations, 0)})
    return pd.DataFrame.from_records(records)


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--permutations", type=int, default=1000)
    # one thread by default: the naive baselines run on one core too, and on a shared 2-core box
    # torch's intra-op threads spin against other processes and distort every timing
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cube = smollm2_cube(args.tokens)
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"cube: SmolLM2-135M eager, {cube.num_layers} layers x {cube.num_heads} heads x {args.tokens} x {args.tokens}, "
          f"torch threads {torch.get_num_threads()}")

    # warm-up on one layer (first-call costs: kernels, pandas, token rules), then one timed run each
    warm = cube.select(layers=[0])
    for function in (head_metrics, reference_head_metrics, naive_head_metrics, per_head_loop):
        function(warm)
    kv_group_similarity(warm, n_permutations=10)
    naive_kv_similarity(warm, 10)

    fast, t_fast = timed(head_metrics, cube)
    reference, t_reference = timed(reference_head_metrics, cube)
    naive, t_naive = timed(naive_head_metrics, cube)
    loop, t_loop = timed(per_head_loop, cube)
    exact = ["layer", "head", "kv_group", "sink_head", "vertical_key", "pattern_class", "n_rows"]
    np.testing.assert_allclose(fast.drop(columns=exact).to_numpy(float), reference.drop(columns=exact).to_numpy(float),
                               atol=1e-5, rtol=1e-5)
    assert all(fast[column].tolist() == reference[column].tolist() for column in exact)
    numeric = [c for c in naive.columns if c not in ("layer", "head", "kv_group", "pattern_class")]
    # the library works per row in float32 (sums in float64), the naive loop in float64
    np.testing.assert_allclose(fast[numeric].to_numpy(float), naive[numeric].to_numpy(float), atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(fast.select_dtypes("number").to_numpy(float), loop.select_dtypes("number").to_numpy(float),
                               atol=1e-6, rtol=1e-5)
    assert (fast.pattern_class == naive.pattern_class).all() and (fast.pattern_class == loop.pattern_class).all()

    kv, t_kv = timed(lambda: kv_group_similarity(cube, n_permutations=args.permutations))
    kv_naive, t_kv_naive = timed(naive_kv_similarity, cube, args.permutations)
    np.testing.assert_allclose(kv[["within", "between", "gap"]].to_numpy(float),
                               kv_naive[["within", "between", "gap"]].to_numpy(float), atol=1e-5)
    np.testing.assert_allclose(kv.p_value.to_numpy(float), kv_naive.p_value.to_numpy(float), atol=0.005)

    rows = [
        (f"head_metrics ({len(fast)} heads, {len(fast.columns)} columns)", "vectorised reducer (library)", t_fast, t_fast),
        ("head_metrics", "float64 reference: dense masks, as before the fast path", t_reference, t_fast),
        ("head_metrics", "naive loop: layer x head x row, numpy", t_naive, t_fast),
        ("head_metrics", "per-head loop of the library reducer", t_loop, t_fast),
        (f"kv_group_similarity (3 measures x 2, {args.permutations} perms)", "vectorised (library)", t_kv, t_kv),
        ("kv_group_similarity", "per-pair loop (rows vectorised)", t_kv_naive, t_kv),
    ]
    print()
    print("| computation | implementation | seconds | time / vectorised |")
    print("| --- | --- | ---: | ---: |")
    for name, impl, seconds, reference in rows:
        print(f"| {name} | {impl} | {seconds:.2f} | {seconds / reference:.1f}x |")
    print()
    print(f"all outputs agree (head_metrics vs the reference to 1e-5 + 1e-5 relative, every column; vs both loops "
          f"to atol 1e-6 / rtol 1e-5, pattern classes equal; "
          f"kv within/between/gap to 1e-5, p-values to 0.005). "
          f"pattern classes: {fast.pattern_class.value_counts().to_dict()}; sink heads: {int(fast.sink_head.sum())}")


if __name__ == "__main__":
    main()
