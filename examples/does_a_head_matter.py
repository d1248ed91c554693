"""Which SmolLM2 heads carry the answer of a factual prompt, by direct logit attribution and by knockout, and
how they compare with the attention-pattern classes. Writes the figures of the README's "Does a head matter?"
section into docs/does_a_head_matter/ and prints the tables it quotes.

    .venv/bin/python examples/does_a_head_matter.py
"""

from __future__ import annotations

from pathlib import Path

import torch

import llm_heatmap as lh
from llm_heatmap.analyses import rollout
from llm_heatmap.analyses.importance.knockout import Edges, knockout_effect, knockout_scan
from llm_heatmap.viz import plot_metric_map, save_figure
from llm_heatmap.viz.contributions import plot_knockout_scan, plot_token_contributions

PROMPT = "The Eiffel Tower is located in the city of"
OUT = Path(__file__).resolve().parent.parent / "docs" / "does_a_head_matter"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    model, tokenizer, spec = lh.load_model("smollm2-135m")
    dla = lh.logit_attribution(model, tokenizer, PROMPT, spec=spec)
    heads = dla.head_table()
    save_figure(plot_metric_map(heads, "share", center=0.0, title=f"SmolLM2: each head's direct share of the "
                                f"logit of {dla.target!r} ({dla.logit:.2f})"), OUT / "dla.png")

    cube = lh.capture_prompt(model, tokenizer, PROMPT, spec=spec)
    classes = lh.head_metrics(cube).set_index(["layer", "head"])
    subject = tuple(i for i, t in enumerate(dla.tokens) if t.strip() in ("E", "iffel", "Tower"))
    last = len(dla.tokens) - 1
    print(f"target {dla.target!r}, logit {dla.logit:.3f}, sum of shares {dla.reconstructed_logit:.3f}; "
          f"subject positions {subject}")
    print("\n| head | DLA share | log p change, this head's last->subject edges cut | last->subject attention "
          "| pattern class |\n| --- | ---: | ---: | ---: | --- |")
    top = heads.reindex(heads.share.abs().sort_values(ascending=False).index).head(8)
    for row in top.itertuples():
        effect = knockout_effect(model, tokenizer, PROMPT, spec=spec, edges=[
            Edges(queries=(last,), keys=subject, layers=(row.layer,), heads=(row.head,))])
        to_subject = float(cube.pattern[row.layer, row.head, last, list(subject)].sum())
        print(f"| L{row.layer}H{row.head} | {row.share:+.2f} | {effect.change:+.3f} | {to_subject:.2f} | "
              f"{classes.loc[(row.layer, row.head), 'pattern_class']} |")

    everywhere = knockout_effect(model, tokenizer, PROMPT, spec=spec, edges=[Edges(queries=(last,), keys=subject)])
    print(f"\nlast -> subject cut in every layer: log p {everywhere.log_prob:.3f} -> {everywhere.knocked_log_prob:.3f}")
    per_layer = []
    for layer in range(spec.num_layers):
        effect = knockout_effect(model, tokenizer, PROMPT, spec=spec, edges=[
            Edges(queries=(last,), keys=subject, layers=(layer,))])
        per_layer.append((effect.change, layer))
    print("layers whose last->subject edges matter most (all heads, one layer): "
          + ", ".join(f"L{layer} {change:+.3f}" for change, layer in sorted(per_layer)[:5]))

    by_head = []
    for layer in range(spec.num_layers):
        for head in range(spec.num_heads):
            effect = knockout_effect(model, tokenizer, PROMPT, spec=spec, edges=[
                Edges(queries=(last,), keys=subject, layers=(layer,), heads=(head,))])
            by_head.append((effect.change, layer, head))
    print("\n| head (knockout) | log p change | DLA share | last->subject attention | pattern class |\n"
          "| --- | ---: | ---: | ---: | --- |")
    shares = heads.set_index(["layer", "head"]).share
    for change, layer, head in sorted(by_head)[:6]:
        to_subject = float(cube.pattern[layer, head, last, list(subject)].sum())
        print(f"| L{layer}H{head} | {change:+.3f} | {shares[(layer, head)]:+.2f} | {to_subject:.2f} | "
              f"{classes.loc[(layer, head), 'pattern_class']} |")

    spans = {"subject (Eiffel Tower)": subject, **{f"{i}:{dla.tokens[i]}": (i,) for i in range(subject[-1] + 1, last + 1)}}
    scan = knockout_scan(model, tokenizer, PROMPT, spec=spec, spans=spans, window=9)
    save_figure(plot_knockout_scan(scan, title=f"SmolLM2, {PROMPT!r} -> {dla.target!r}: last position's edges cut "
                                   "in a 9-layer window"), OUT / "knockout_scan.png")
    worst = scan.nsmallest(3, "change")
    print("knockout scan, largest drops: " + ", ".join(
        f"{r.span} around L{r.layer} {100 * r.relative_probability_change:+.0f}%" for r in worst.itertuples()))

    contributions = lh.token_contributions(model, tokenizer, PROMPT, spec=spec)
    attention = rollout(cube)[-1, -1]
    save_figure(plot_token_contributions(contributions.per_layer, contributions.input_attribution(), attention,
                                         contributions.tokens, title=f"SmolLM2, {PROMPT!r}: ALTI per layer; input "
                                         "attribution of the last token, ALTI rollout vs attention rollout"),
                OUT / "contributions.png")
    print("input attribution of the last token (ALTI rollout | attention rollout): " + ", ".join(
        f"{t!r} {a:.2f}|{b:.2f}" for t, a, b in zip(contributions.tokens, contributions.input_attribution(), attention)))

    minilm, minilm_tokenizer, minilm_spec = lh.load_model("minilm-l6")
    sentence = "The Eiffel Tower is located in Paris."
    encoder = lh.token_contributions(minilm, minilm_tokenizer, sentence, spec=minilm_spec)
    encoder_cube = lh.capture_prompt(minilm, minilm_tokenizer, sentence, spec=minilm_spec)
    save_figure(plot_token_contributions(encoder.per_layer, encoder.input_attribution(-1),
                                         rollout(encoder_cube)[-1, -1], encoder.tokens,
                                         title=f"MiniLM, {sentence!r}: ALTI per layer; input attribution of [SEP]"),
                OUT / "contributions_minilm.png")


if __name__ == "__main__":
    with torch.no_grad():
        main()
