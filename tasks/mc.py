"""
Multiple choice: ScienceQA as LLaVA's eval_science_qa.py scores it, and plain multiple choice (the
option letter, read from a letter, "(B)", "The answer is B." or the option's text).
"""
import re

from tasks.prompts import LETTERS
from tasks.vqa import normalize_vqa


LLAVA_SQA_LETTERS = "ABCDE"  # eval_science_qa.py's --options default


def llava_sqa_letter(text):
    """The letter LLaVA's eval_science_qa.py reads, by its three rules in its order, or None (its
    'FAILED'): the answer is exactly one of A-E; or it starts 'X. ' with X in A-E; or
    'The answer is ([A-Z]).' occurs exactly once (case-sensitive; the '.' is any character). The
    answer is stripped first, as LLaVA's model_vqa_science.py writes it. A letter past the question's
    options counts as wrong there (get_pred_idx gives -1)."""
    t = text.strip()
    if len(t) == 1 and t in LLAVA_SQA_LETTERS:
        return t
    if len(t) >= 3 and t[0] in LLAVA_SQA_LETTERS and t[1:3] == ". ":
        return t[0]
    found = re.findall(r"The answer is ([A-Z]).", t)
    return found[0] if len(found) == 1 else None


def extract_letter(text, n_options, options=None):
    """
    The option letter an answer picks, or None. First LLaVA's own rules (llava_sqa_letter): where
    they read a letter, that letter is the answer (None if it is not one of the n_options), so every
    answer LLaVA's ScienceQA scorer reads is read the same here ('A. The answer is B.' is A). Where
    they read nothing, our further forms (after VLMEvalKit's can_infer, which takes a single option
    letter standing alone), tried in this order:
      1. the whole answer is one letter, any case, maybe bracketed or punctuated: 'b', '(B)', 'B.'
      2. an answer phrase: 'The answer is D' (at the end), 'Answer: B', 'the correct option is (C)',
         'choice C'; the letter must be a capital, or a small letter that ends the answer ('the answer is b.')
      3. a leading capital with a delimiter: 'B) foo', '(B) foo', 'B: foo', 'B.foo'
      4. exactly one distinct capital in brackets anywhere: 'I pick (C) because ...'
      5. exactly one distinct capital standing alone as a word, where 'A' and 'I' followed by a
         lowercase word (other than or/and/is/was) are read as the article and the pronoun:
         'A red circle.' picks nothing, 'I think B' picks B, 'A or B' is ambiguous: None
      6. options given: the answer is exactly one option's text after VQA normalisation
    Only letters of the first n_options count. So the article 'a' never becomes option A, except as a
    whole one-letter answer, where it can only be the letter.
    """
    llava = llava_sqa_letter(text)
    if llava is not None:
        return llava if llava in LETTERS[:n_options] else None
    valid = LETTERS[:n_options]
    t = text.replace("*", "").strip()  # markdown emphasis: '**B**'
    if not t or not valid:
        return None
    m = re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?[.:)]?", t)
    if m:
        return m.group(1).upper() if m.group(1).upper() in valid else None
    m = re.search(rf"\b(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be))?\s*:?\s*[(\[]?"
                  rf"(?:([{valid}])(?![A-Za-z])|([{valid.lower()}])[)\]]?[.!]?\s*$)", t)
    if m:
        return (m.group(1) or m.group(2)).upper()
    m = re.match(rf"[(\[]?([{valid}])[)\].:](?:\s|$)", t)
    if m:
        return m.group(1)
    found = set(re.findall(rf"[(\[]([{valid}])[)\]]", t))
    if len(found) == 1:
        return found.pop()
    found = {m.group(1) for m in re.finditer(rf"(?<![A-Za-z'])([{valid}])(?![A-Za-z'])", t)
             if not (m.group(1) in "AI" and re.match(r"\s+(?!(?:or|and|is|was)\b)[a-z]", t[m.end():]))}
    if len(found) == 1:
        return found.pop()
    if options:
        hits = [i for i, o in enumerate(options[:n_options]) if normalize_vqa(o) == normalize_vqa(t)]
        if len(hits) == 1:
            return LETTERS[hits[0]]
    return None
