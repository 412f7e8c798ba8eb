"""Video-MME prompt, answer extraction and scoring, following lmms-eval's ``tasks/videomme/utils.py``."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video. "
                 "Respond with only the letter (A, B, C, or D) of the correct option.")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
# lmms-eval's list, with its missing commas kept: two pairs of prefixes are merged into one string each, so
# "The best option is" and "Best answer:" alone are *not* stripped (scores must match lmms-eval's).
ANSWER_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is" "The correct option is",
    "Best answer:" "Best option:",
)


def videomme_prompt(question: str, options: list[str], post_prompt: str = POST_PROMPT) -> str:
    """lmms-eval's text: option prompt, question, one option per line, post-prompt (joined by newlines)."""
    return OPTION_PROMPT + "\n" + question + "\n" + "\n".join(options) + "\n" + post_prompt


def extract_letter(reply: str) -> str:
    """lmms-eval's ``extract_characters_regex``: strip answer prefixes; "" for a reply of more than 10 words
    without any of A-D; else the first capital A, B, C or D anywhere in the reply ("" if none)."""
    s = reply.strip()
    for prefix in ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    m = re.search(r"[ABCD]", s)
    return m[0] if m else ""


def videomme_scores(results: Iterable[dict]) -> dict:
    """Accuracy x100 overall (lmms-eval's metric) and by duration, task type and domain.

    Each result has answer (a letter), prediction (the reply), duration, task_type and domain."""
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    correct = total = 0
    for r in results:
        ok = int(extract_letter(r["prediction"]).lower() == r["answer"].strip().lower())
        correct += ok
        total += 1
        for field in ("duration", "task_type", "domain"):
            g = groups[field][r[field]]
            g[0] += ok
            g[1] += 1
    return {"accuracy": 100 * correct / total if total else 0.0, "questions": total,
            **{f"by_{field}": {k: round(100 * c / n, 2) for k, (c, n) in sorted(v.items())}
               for field, v in groups.items()}}
