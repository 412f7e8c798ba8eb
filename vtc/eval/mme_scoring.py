"""MME answer parsing and scoring, following lmms-eval's ``tasks/mme/utils.py`` rules exactly."""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SUFFIX = " Please answer yes or no."
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def mme_prompt(question: str, post_prompt: str = POST_PROMPT) -> str:
    """lmms-eval's default MME text: the yes/no suffix replaced by the LLaVA short-answer prompt."""
    q = question.strip()
    if post_prompt:
        q = q.replace(MME_SUFFIX, "") + post_prompt
    return q


def parse_yes_no(pred: str) -> str:
    """'yes', 'no' or 'other': lower-case, drop '.', exact yes/no, y/n, else yes/no in the first 4 chars."""
    p = pred.lower().strip().replace(".", "")
    if p in ("yes", "no"):
        return p
    if len(p) == 1:
        return {"y": "yes", "n": "no"}.get(p, "other")
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(results: Iterable[dict]) -> dict:
    """Score predictions. Each result has question_id, category, answer ("Yes"/"No") and prediction (text).

    Per image (question_id): acc = 100 * mean(correct), acc+ = 100 if both correct; a category's score is the
    mean over its images of acc + acc+ (max 200). Perception sums its 10 categories, cognition its 4.
    """
    by_cat: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        gt = r["answer"].lower().strip().replace(".", "")
        if gt not in ("yes", "no"):
            raise ValueError(f"MME answers must be Yes or No; got {r['answer']!r} for {r['question_id']}")
        by_cat[r["category"]][r["question_id"]].append(float(parse_yes_no(r["prediction"]) == gt))
    categories = {}
    for cat, per_image in sorted(by_cat.items()):
        acc = acc_plus = 0.0
        for qid, s in per_image.items():
            if len(s) != 2:
                raise ValueError(f"MME needs exactly 2 questions per image; {qid} has {len(s)}")
            acc += sum(s) / 2 * 100
            acc_plus += (sum(s) == 2) * 100
        n = len(per_image)
        categories[cat] = {"score": (acc + acc_plus) / n, "acc": acc / n, "acc_plus": acc_plus / n, "images": n}
    perception = sum(v["score"] for c, v in categories.items() if c in PERCEPTION)
    cognition = sum(v["score"] for c, v in categories.items() if c in COGNITION)
    total_q = sum(2 * v["images"] for v in categories.values())
    correct = sum(v["acc"] / 100 * 2 * v["images"] for v in categories.values())
    return {"perception": perception, "cognition": cognition, "total": perception + cognition,
            "question_accuracy": correct / total_q if total_q else 0.0, "categories": categories}
