"""
How a benchmark question is put to the model: the answer-mode suffixes (LLaVA's and LLaVA-Reasoner's),
option letters and lines, and reading them back from a prompt.
"""
import re

from data import DataError


# the prompt suffixes of LLaVA-1.5's eval scripts (short answer, multiple choice) and LLaVA-Reasoner (CoT)
SHORT_SUFFIX = "Answer the question using a single word or phrase."


MC_SUFFIX = "Answer with the option's letter from the given choices directly."


COT_SUFFIX = "Generate a reason first and then output a short answer."


DIRECT_SUFFIX = "Answer the question with a short answer."  # LLaVA-Reasoner's direct mode


MODE_SUFFIXES = (SHORT_SUFFIX, MC_SUFFIX, COT_SUFFIX, DIRECT_SUFFIX)


COT_MARKER = "### Answer:"


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def with_suffix(text, suffix):
    """text + '\\n' + suffix, unless the text already carries it (LLaVA's own question files do)."""
    return text if suffix in text else text.rstrip() + "\n" + suffix


def strip_modes(text):
    """The question without the suffixes that select an answer mode (MODE_SUFFIXES), stripped."""
    for suffix in MODE_SUFFIXES:
        text = text.replace(suffix, "")
    return text.strip()


def in_mode(text, suffix):
    """The same question asked in another answer mode: its mode suffixes replaced by `suffix`."""
    return with_suffix(strip_modes(text), suffix)


def option_lines(question, options):
    """LLaVA-1.5's multiple-choice layout (model_vqa_mmbench): the question, then 'A. option' lines."""
    return "\n".join([question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)])


def parse_options(text):
    """The options written in a ScienceQA prompt, either LLaVA's conversion 'Options: (A) x (B) y' or
    LLaVA-1.5's 'A. x' lines; [] if there are none. Letters must run A, B, C... in order."""
    line = next((l for l in text.splitlines() if l.startswith("Options:")), None)
    if line is not None:
        found = re.findall(r"\(([A-Z])\)\s*(.*?)\s*(?=\([A-Z]\)|$)", line[len("Options:"):])
    else:
        found = re.findall(r"^([A-Z])\. (.*?)\s*$", text, re.M)
    letters = "".join(l for l, _ in found)
    return [o for _, o in found] if found and LETTERS.startswith(letters) else []


def gold_letter(answer, options):
    """A gold answer as an option letter: 'B', 1 (an index, as in ScienceQA's problems.json) or the
    option's text. Raises DataError when it is none of them."""
    n = len(options)
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n:
        return LETTERS[answer]
    if isinstance(answer, str):
        if len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[:n]:
            return answer.strip().upper()
        if answer in options:
            return LETTERS[options.index(answer)]
    raise DataError(f"answer {answer!r} is not an option letter A-{LETTERS[n - 1]}, an index or an option's text",
                    "malformed record")
