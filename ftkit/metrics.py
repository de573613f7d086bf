"""Task metrics: token-weighted eval loss, ROUGE (offline), accuracy/F1/confusion, SQuAD EM/F1.
Not here: when to evaluate (loop.py) or what to generate (the scripts)."""

from __future__ import annotations

import torch

from ftkit import distributed

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


@torch.no_grad()
def mean_loss(acc, model, dl, loss_sums) -> float:
    """Token-weighted mean loss over ``dl``, each example counted once across processes;
    ``loss_sums(batch)`` gives per-example loss sums and token counts."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    for batch in dl:
        distributed.stop_point(acc)  # a stop signal during training ends the evaluation here
        loss_sum, count = acc.gather_for_metrics(loss_sums(batch))
        total += torch.stack([loss_sum.sum().double(), count.sum().double()])
    model.train()
    loss_sum, tokens = total.tolist()
    return loss_sum / max(tokens, 1)


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


# --- Classification -------------------------------------------------------------------------------


def classification(predictions, labels, num_labels: int) -> dict:
    """Accuracy, F1 (binary: of class 1; more classes: macro over classes) and the confusion matrix.
    ``confusion[i][j]`` counts examples of true class ``i`` predicted as ``j``. A class with no predicted and no true
    examples contributes F1 0 to the macro mean (as scikit-learn does with ``zero_division=0``)."""
    predictions, labels = [int(p) for p in predictions], [int(y) for y in labels]
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    confusion = [[0] * num_labels for _ in range(num_labels)]
    for p, y in zip(predictions, labels):
        confusion[y][p] += 1

    def f1_of(c: int) -> float:
        tp = confusion[c][c]
        predicted = sum(confusion[r][c] for r in range(num_labels))
        actual = sum(confusion[c])
        return 2 * tp / (predicted + actual) if predicted + actual else 0.0

    f1 = f1_of(1) if num_labels == 2 else sum(f1_of(c) for c in range(num_labels)) / num_labels
    correct = sum(confusion[c][c] for c in range(num_labels))
    return {"accuracy": correct / max(len(labels), 1), "f1": f1, "examples": len(labels), "confusion": confusion}


# --- SQuAD exact match and F1 (the official answer normalisation) ---------------------------------


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """F1 of the bag of normalised words; two empty answers agree (1.0), one empty answer scores 0."""
    from collections import Counter

    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: list[str], answers: list[list[str]]) -> dict:
    """Mean exact match and F1 (x100), each the max over an example's gold answers."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    em = [max(exact_match(p, g) for g in golds) if golds else 0.0 for p, golds in zip(predictions, answers)]
    f1 = [max(token_f1(p, g) for g in golds) if golds else 0.0 for p, golds in zip(predictions, answers)]
    n = max(len(predictions), 1)
    return {"exact_match": 100.0 * sum(em) / n, "f1": 100.0 * sum(f1) / n, "examples": len(predictions),
            "per_example": list(zip(em, f1))}
