"""Video-MME (w/o subtitles) prompt, answer extraction and scoring, as lmms-eval does them (the version in
:data:`vtc.eval.LMMS_EVAL_VERSION`): ``tasks/videomme/utils.py`` and ``tasks/_task_utils/mcq_extract.py``.

Quirks of lmms-eval reproduced on purpose (scores must match theirs):
- the no-subtitle prompt still says "based on the video and the subtitles";
- the reported score compares the extracted letter with the gold answer exactly (case-sensitive, unstripped:
  their aggregation uses ``==``; only the per-question ``score`` field lower-cases).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Sequence

OPTION_PROMPT = ("Select the best answer to the following multiple-choice question based on the video and the "
                 "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
CHOICES = ("A", "B", "C", "D")

#: phrases after which the first choice letter counts as the answer (lmms-eval's list, same order)
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
#: how sure each way of writing a letter is; the highest wins, then the last position in the reply
PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
            "space": 2, "fallback": 0}
PATTERNS = (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"), ("space", "{} "))


def videomme_prompt(question: str, options: list[str], post_prompt: str = POST_PROMPT) -> str:
    """lmms-eval's text: option prompt, question, one option per line, post-prompt (joined by newlines)."""
    return OPTION_PROMPT + "\n" + question + "\n" + "\n".join(options) + "\n" + post_prompt


def extract_letter(reply: str, choices: Sequence[str] = CHOICES) -> str:
    """The answer letter lmms-eval reads from a reply ("" if none): every way a letter can stand (first or last
    standalone character, after an answer phrase, "(A)", "A.", "A:", "A)", "A ") is a candidate with a priority;
    any occurrence counts only when nothing else matched. The highest priority wins, then the latest position."""
    if not reply or not reply.strip():
        return ""
    text = reply.strip()
    for ch in ",.!?;:'\"":
        text = text.strip(ch)
    text = f" {text} "
    cands: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for kind, pattern in PATTERNS:
        for c in choices:
            pos = text.rfind(pattern.format(c))
            if pos != -1:
                cands.append((PRIORITY[kind], pos, c))
    lower = text.lower()
    for phrase in ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for c in choices:
                pos = text.find(c, at + len(phrase))
                if pos != -1:
                    cands.append((PRIORITY["phrase"], pos, c))
    core = text.strip()
    for c in choices:
        if core.startswith(c) and (len(core) == 1 or not core[1].isalpha()):
            cands.append((PRIORITY["start"], 0, c))
    for c in choices:
        if core.endswith(c) and (len(core) == 1 or not core[-2].isalpha()):
            cands.append((PRIORITY["end"], len(text) - 1, c))
    if not cands:
        cands = [(PRIORITY["fallback"], text.rfind(c), c) for c in choices if c in text]
    return max(cands, key=lambda x: (x[0], x[1]))[2] if cands else ""


def videomme_scores(results: Iterable[dict]) -> dict:
    """Accuracy x100 overall (lmms-eval's ``videomme_perception_score``) and by duration, task type, domain and
    sub-category. Each result has answer (a letter), prediction (the reply), duration, task_type, domain and
    (optionally) sub_category."""
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    correct = total = 0
    for r in results:
        ok = int(extract_letter(r["prediction"]) == r["answer"])
        correct += ok
        total += 1
        for field in ("duration", "task_type", "domain", "sub_category"):
            if field in r:
                g = groups[field][r[field]]
                g[0] += ok
                g[1] += 1
    return {"accuracy": 100 * correct / total if total else 0.0, "questions": total,
            **{f"by_{field}": {k: round(100 * c / n, 2) for k, (c, n) in sorted(v.items())}
               for field, v in groups.items()}}
