"""The answer normalisation and accuracy of the official VQA evaluation (GT-Vision-Lab/VQA, `vqaEval.py`),
which LAVIS' VQA and GQA tasks and the DEMON scripts use as well.

The normalisation keeps every quirk of the official code, because published numbers carry them:

- a mark of `PUNCTUATION` is deleted when the *original* text has it before or after a space, or when the
  text holds a digit-comma-digit anywhere (then every mark is deleted: "1,000" -> "1000",
  "a-b 1,2" -> "ab 12"); otherwise it becomes a space ("red-white" -> "red white");
- a period is deleted unless a digit follows it ("3.5" stays, "3." and "yes." lose it), and at most 32
  of them: the official code passes `re.UNICODE` (32) where `re.sub` takes its count, and the look-behind
  for a digit it meant to write (`(?!<=\\d)`) is a look-ahead that never fails;
- "none" becomes "0" along with the number words "zero" to "ten", and the articles a/an/the are dropped;
- apostrophe-less contractions are repaired ("dont" -> "don't"), with the table's one entry that goes
  the other way ("somebody'd" -> "somebodyd").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32  # the official count, see the module docstring
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}
NUMBER_WORDS |= {"six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})

# The official table maps each of these contractions from every spelling that leaves out exactly one of its
# apostrophes ("dont" -> "don't"; "couldnt've" and "couldn'tve" -> "couldn't've"). Its capitalised keys
# ("Im") never match, as the words are lowercased first. Its two entries that map a word to itself ("let's")
# are left out, as they change nothing.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas
wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've
who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd
you'd've you'll you're you've
""".split()
CONTRACTIONS = {
    form[:i] + form[i + 1 :]: form for form in _CONTRACTED for i, c in enumerate(form) if c == "'"
}
CONTRACTIONS["somebody'd"] = "somebodyd"  # the official entry, backwards


def process_punctuation(text: str, max_periods: int = _MAX_PERIODS) -> str:
    """The official `processPunctuation`: punctuation deleted or spaced out, periods dropped (see the
    module docstring for the rules and their quirks); `max_periods` 0 drops every period (DEMON's fix
    of the official cap)."""
    delete = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        # The test reads the text as given, not as earlier marks left it.
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete or spaced else " ")
    return _PERIOD.sub("", out, count=max_periods)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words to digits, articles dropped,
    contractions repaired, single spaces."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalise_answer(text: str) -> str:
    """An answer as the official evaluation compares it: `process_punctuation`, then
    `process_digit_article`."""
    return process_digit_article(process_punctuation(text))


def exact_match(prediction: str, answer: str) -> bool:
    """GQA's score in LAVIS (and the video QA sets', which use the same task): the normalised answers are
    equal."""
    return normalise_answer(prediction) == normalise_answer(answer)


def _one_line(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str], official: bool = False) -> float:
    """The VQA accuracy of one prediction against the human answers (ten in VQAv2): min(1, matches / 3),
    where `matches` counts the humans who gave the prediction, averaged over the ways of leaving one human
    out. With k of 10 humans agreeing this is 0.3, 0.6, 0.9 for k = 1, 2, 3, and 1 from k = 4.

    Both sides are normalised (`normalise_answer`). `official` follows the official script to the letter
    (GT-Vision-Lab/VQA master, commit a013f00): it normalises neither side when all humans gave the same
    answer, so "Yes." then misses "yes". (LAVIS copies the 2017 version, which always normalises the
    prediction but only `process_punctuation`s the humans' answers, and only when they differ.)
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred, humans = _one_line(prediction), [_one_line(a) for a in answers]
    if not official or len(set(humans)) > 1:
        pred, humans = normalise_answer(pred), [normalise_answer(a) for a in humans]
    agree = sum(h == pred for h in humans)
    # Leaving out an agreeing human leaves agree - 1 matches, leaving out another leaves agree.
    left_out = [agree - (h == pred) for h in humans]
    return sum(min(1.0, m / 3) for m in left_out) / len(humans)
