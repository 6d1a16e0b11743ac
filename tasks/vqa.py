"""
VQA: EvalAI's answer processor (mmf; LLaVA copies it into llava/eval/m4c_evaluator.py and uses it for
VQAv2 submissions and TextVQA), i.e. the VQA challenge's normalisation and its 3-of-10 accuracy.
"""
import re


_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've""".split())


_NUMBERS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7",
                eight="8", nine="9", ten="10")


_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: '(?!<=' is no lookbehind, so any '.' not before a digit goes


_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def normalize_vqa(text):
    """VQA answer normalisation: lower case; ',' '?' dropped; punctuation removed (next to a space)
    or turned into a space; '.' removed unless before a digit; number words 'none'..'ten' -> digits;
    articles a/an/the dropped; 'dont' -> "don't" style contractions. 'Two.' -> '2',
    'The red circle.' -> 'red circle'."""
    text = str(text).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(pred, answers):
    """
    The VQA score of one answer. With 10 human answers (VQAv2, TextVQA, VizWiz), the official rule:
    the mean over the 10 leave-one-out sets of 9 of min(1, #matches / 3). It is the min(#matches / 3, 1)
    of the papers averaged, and differs from it only for 1-3 matches: 0.3, 0.6, 0.9 instead of 1/3,
    2/3, 1. With any other number of gold answers (one string, a few aliases) there is no human
    agreement to weigh: 1.0 if the answer matches one of them, else 0.0 (ST-VQA's accuracy in
    LLaVA's m4c_evaluator.py). Both sides are always normalised (normalize_vqa, EvalAI's processor).
    The official vqaEval.py at its current commit (GT-Vision-Lab/VQA a013f00, "Fixed processing
    answers bug") normalises the gold answers AND the prediction only when the ten gold answers
    disagree; when all ten agree it compares the prediction as written (stripped), so there 'Two.'
    scores 0 against ten '2'. We follow LLaVA's pipeline instead, which normalises every prediction
    before scoring (convert_vqav2_for_submission.py for VQAv2, m4c_evaluator.py for TextVQA): on
    answers already normalised the two agree exactly.
    """
    if isinstance(answers, str):
        answers = [answers]
    p, gold = normalize_vqa(pred), [normalize_vqa(a) for a in answers]
    if len(gold) == 10:
        return sum(min(1.0, sum(g == p for j, g in enumerate(gold) if j != i) / 3) for i in range(10)) / 10
    return float(p in gold)
