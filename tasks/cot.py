"""
CoT (LLaVA-Reasoner): the short answer follows the last '### Answer:', then the mc or vqa rule; and
answer_correct, the check of a sampled answer against the gold one that selfreward.py's answer mode
mines pairs with.
"""
import re

from tasks.mc import extract_letter
from tasks.prompts import COT_MARKER
from tasks.vqa import normalize_vqa


def cot_answer(text):
    """The text after the LAST '### Answer:', stripped; None when the marker is missing."""
    i = text.rfind(COT_MARKER)
    return None if i < 0 else text[i + len(COT_MARKER):].strip()


_NUMBER = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+))\s*(%|[a-z]+)?")


def read_number(text):
    """A short answer that is a number, with at most one unit word after it, as (value, unit or ''):
    '12', '1,024', '-3.5', '40%', '12 cm', 'two' (a number word VQA normalisation reads); else None."""
    t = str(text).strip().lower().replace(",", "").rstrip(".")
    m = _NUMBER.fullmatch(t) or _NUMBER.fullmatch(normalize_vqa(text))
    return None if m is None else (float(m.group(1)), m.group(2) or "")


def answer_correct(pred, q, tolerance=0.05):
    """Whether the short answer pred is right for q (a question as benchmark_question gives it):
      options   the option letter extract_letter reads equals the gold letter
      numbers   within `tolerance` of a gold number, relative (a gold 0 only matches 0); units must agree
                when both answers give one ('12 cm' matches '12', not '12 m'). LLaVA-Reasoner did not
                publish its matcher; this rule is ours, after ChartQA's relaxed accuracy but not the same:
                ChartQA's relaxed_correctness reads only a bare float (a trailing '%' divides it by 100),
                so '1,200', '12 cm' or 'two' fall back to exact match there and count as numbers here
      otherwise normalize_vqa(pred) equals a normalised gold answer (exact match, not VQA's 3-of-10)."""
    if "options" in q:
        return extract_letter(pred, len(q["options"]), q["options"]) == q["answer"]
    p, norm = read_number(pred), normalize_vqa(pred)
    for gold in q["answers"]:
        g = read_number(gold)
        if p is not None and g is not None:
            if (not p[1] or not g[1] or p[1] == g[1]) and abs(p[0] - g[0]) <= tolerance * abs(g[0]):
                return True
        elif norm == normalize_vqa(gold):
            return True
    return False
