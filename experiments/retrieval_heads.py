"""The README's retrieval-head result: which heads copy the needle, where the model still recalls it,
and whether the retrieval heads are the induction heads.

    python -m experiments.retrieval_heads --out docs/experiments/retrieval --png docs/retrieval_heads.png

Runs `retrieval_head_scores` on the grid `--lengths` x `--depths` (greedy, chat template), then the
induction probe (BOS + 50 random tokens repeated), on one model. Writes into OUT: `heads.csv` (one
row per head: retrieval score and copies, induction score), `runs.csv` (one row per grid cell: the
answer and its recall) and `reading.md`, the printed summary; `--png` is the by-depth figure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from llm_heatmap.models.files import atomic_output


def summary(heads, runs, threshold: float, model: str) -> list[str]:
    chosen = heads[heads["probe_retrieval_score"] > threshold].sort_values("probe_retrieval_score", ascending=False)
    k = len(chosen)
    induction = heads.sort_values("probe_induction_score", ascending=False).head(max(k, 1))
    retrieval_set = set(zip(chosen["layer"], chosen["head"]))
    induction_set = set(zip(induction["layer"], induction["head"]))
    shared = sorted(retrieval_set & induction_set)
    rho = spearmanr(heads["probe_retrieval_score"], heads["probe_induction_score"], nan_policy="omit").statistic
    per_length = runs.groupby("context_length").agg(recalled=("recalled", "sum"), runs=("recalled", "size"),
                                                   mean_recall=("recall", "mean"))
    lines = [f"# Retrieval heads of {model}", "",
             f"{int(runs['recalled'].sum())} of {len(runs)} runs recalled the needle (ROUGE-1 recall of the answer >= 0.5).",
             "", "| context length | runs recalled | mean recall |", "| --- | --- | --- |"]
    lines += [f"| {n} | {int(r.recalled)} of {int(r.runs)} | {r.mean_recall:.2f} |" for n, r in per_length.iterrows()]
    lines += ["", f"{k} of {len(heads)} heads ({100 * k / len(heads):.1f}%) score above {threshold}:", "",
              "| head | KV group | retrieval score | copies | induction score |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| L{r.layer}H{r.head} | {r.kv_group} | {r.probe_retrieval_score:.3f} | {r.probe_retrieval_copies} | "
              f"{r.probe_induction_score:.3f} |" for r in chosen.itertuples()]
    lines += ["", f"Top {len(induction_set)} induction heads: "
              + ", ".join(f"L{r.layer}H{r.head} ({r.probe_induction_score:.2f})" for r in induction.itertuples()),
              f"Shared with the retrieval heads: {len(shared)} of {k}"
              + (f" ({', '.join(f'L{l}H{h}' for l, h in shared)})" if shared else ""),
              f"Spearman correlation of retrieval and induction scores over all heads: {rho:.2f}"]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="250,500,1000,2000,4000,8000")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llm_heatmap.analyses.heads.induction_probe import induction_probe_scores
    from llm_heatmap.analyses.heads.retrieval_probe import retrieval_head_scores
    from llm_heatmap.models import load_model
    from llm_heatmap.viz.figures import save_figure
    from llm_heatmap.viz.retrieval_figures import plot_retrieval_probe

    model, tokenizer, spec = load_model(args.model)
    start = time.perf_counter()
    result = retrieval_head_scores(
        model, tokenizer, spec=spec, context_lengths=[int(n) for n in args.lengths.split(",")],
        depths=[float(d) for d in args.depths.split(",")],
        on_run=lambda row: print(f"{row['context_length']:>5} tokens, depth {row['depth']:.2f}: recall "
                                 f"{row['recall']:.2f}  {row['answer'][:80]!r}  ({time.perf_counter() - start:.0f} s)",
                                 flush=True))
    induction = induction_probe_scores(model, tokenizer, spec=spec, length=50)
    heads = result.heads.merge(induction, on=["layer", "head", "kv_group"])
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table in (("heads", heads), ("runs", result.runs)):
        with atomic_output(args.out / f"{name}.csv", force=True) as temp:
            table.to_csv(temp, index=False, float_format="%.6g")
    lines = summary(heads, result.runs, args.threshold, args.model)
    lines += ["", f"{len(result.runs)} runs in {time.perf_counter() - start:.0f} s on {args.threads} threads."]
    with atomic_output(args.out / "reading.md", force=True) as temp:
        temp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.png:
        chosen = result.retrieval_heads(args.threshold)
        shown = list(zip(chosen["layer"], chosen["head"]))[:7]
        save_figure(plot_retrieval_probe(result.run_heads(), shown or None,
                                         title=f"{args.model}: retrieval heads by needle depth and context length "
                                         "(hatched: no recall, not counted)"), args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
