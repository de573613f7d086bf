"""Task metrics: ROUGE (rouge-score, offline), accuracy/F1, SQuAD exact match/F1."""

from __future__ import annotations

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (x100) with Porter stemming; rougeLsum splits sentences on newlines."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {k: 0.0 for k in ROUGE_KEYS}
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references):
        # rougeLsum treats each line as a sentence
        scores = scorer.score(ref.strip(), pred.strip())
        for k in ROUGE_KEYS:
            totals[k] += scores[k].fmeasure
    return {k: 100.0 * v / len(predictions) for k, v in totals.items()}


def comparison_table(base: dict[str, float], tuned: dict[str, float], keys=ROUGE_KEYS) -> str:
    """A plain-text table of base vs fine-tuned scores and the absolute improvement."""
    lines = [f"{'metric':<10} {'base':>8} {'tuned':>8} {'delta':>8}"]
    for k in keys:
        lines.append(f"{k:<10} {base[k]:8.2f} {tuned[k]:8.2f} {tuned[k] - base[k]:+8.2f}")
    return "\n".join(lines)
