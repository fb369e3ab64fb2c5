"""Questions about a scene, from a small grammar: whole templates per latent, with a held-out part.

A question is a *template* with slots, filled with words. Templates are either shared frames that take the
latent's noun ("What is the {noun} of {it}?", "And its {noun}?", "{Noun}?") or frames of one latent ("How big is
{it}?", "Where is {it} going?"). Every template belongs to one *part* of the grammar:

- ``train``: the only phrasings training ever sees;
- ``validation``: for choosing schedules and settings;
- ``test``: whole templates held out for the evaluation's "held-out phrasings" and follow-up figures.

Slot words (the latents' nouns, the referents) are shared by all parts; a held-out frame recombines them into a
sentence training has not seen, with a few words of its own, as users do ("Please give the colour.", "Where is it
located?"). A held-out figure measures generalisation over phrasing.

``yes_no`` templates ("Is it moving?") get an answer that starts with "Yes," or "No," (``captions.answer_for``).
"""

from __future__ import annotations

import functools
import itertools
import re
from dataclasses import dataclass

import numpy as np

PARTS = ("train", "validation", "test")
ASKED = ("shape", "colour", "size", "position", "count", "motion", "describe")

# Slot words. ``{it}`` is the thing asked about; ``{noun}`` the latent's name (``NOUNS``).
IT = ("it", "the object", "the thing", "this object")
# Referents only the training part uses: more ways to point at the thing, while the held-out parts' phrasings stay
# exactly what they were (their figures stay comparable from one model to the next).
IT_TRAIN_ONLY = ("the item", "that object", "this thing", "the one shown")
NOUNS: dict[str, tuple[str, ...]] = {
    "shape": ("shape", "form"),
    "colour": ("colour", "color"),
    "size": ("size",),
    "position": ("position", "location"),
    "count": ("number of objects",),
    "motion": ("motion", "movement", "direction"),
}

# Frames every latent with a noun takes, by part.
SHARED: dict[str, tuple[str, ...]] = {
    "train": ("What is the {noun} of {it}?", "Tell me the {noun} of {it}.", "{Noun}?", "And its {noun}?",
              "What about the {noun}?", "Can you tell me the {noun}?", "Name the {noun}.",
              "What's the {noun}?", "Its {noun}?", "The {noun}?", "What's its {noun}?", "Tell me its {noun}.",
              "I'm curious about the {noun}.", "Could you tell me the {noun}?", "Which {noun}?",
              "{Noun} of {it}?", "Now the {noun}.", "What {noun} does {it} show?", "Identify the {noun}.",
              "I need the {noun}.", "Any idea of the {noun}?", "What is {it}'s {noun}?",
              "Report the {noun} of {it}."),
    "validation": ("I would like to know the {noun}.", "Say the {noun} of {it}.", "What would you call its {noun}?",
                   "I'd like the {noun}.", "Could you name the {noun} of {it}?"),
    "test": ("How about its {noun}?", "Do you know the {noun} of {it}?", "Please give the {noun}.",
             "And what is the {noun}?"),
}

# Frames of one latent, by part.
OWN: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {
        "train": ("What shape is {it}?", "What kind of object is this?", "What object is this?",
                  "Which shape do you see?", "What is {it} shaped like?", "What sort of object is {it}?",
                  "What form does {it} take?", "What is {it}?", "What is this?",
                  "What shape does {it} show?", "Identify the object.", "Which kind of object is {it}?",
                  "What solid is {it}?", "What object do you see?", "Which shape does {it} look like?"),
        "validation": ("Which object is it?", "What shape has {it} got?", "Which geometric form is {it}?"),
        "test": ("What form does {it} have?", "Which shape is {it}?", "What kind of thing do you see?"),
    },
    "colour": {
        "train": ("What colour is {it}?", "What color is {it}?", "Which colour is {it}?",
                  "What colour do you see?", "Which color does {it} have?",
                  "In what colour is {it}?", "What colour is this?", "What color does {it} show?",
                  "Which colour do you see?", "What color would you call {it}?", "Is {it} red, green or blue?"),
        "validation": ("What color do you see?", "What's the shade of {it}?", "Which colour has {it} got?"),
        "test": ("What colour does {it} have?", "Which color is {it}?", "What colour is {it} painted?"),
    },
    "size": {
        "train": ("How big is {it}?", "Is {it} large or small?", "What size is {it}?", "How large is {it}?",
                  "Is {it} big or small?", "How small is {it}?",
                  "Large or small?", "What size do you see?"),
        "validation": ("Is {it} small or large?", "How large or small is {it}?", "What's the size of {it} like?"),
        "test": ("How big is {it}, large or small?", "What size does {it} have?", "Is {it} small or big?"),
    },
    "position": {
        "train": ("Where is {it}?", "Is {it} on the left, in the centre or on the right?",
                  "Where do you see {it}?", "On which side is {it}?", "Where is {it} placed?",
                  "Where is {it} in the picture?", "Left, centre or right?", "Where does {it} sit?",
                  "Where is {it} positioned?", "In which part is {it}?", "Where do you find {it}?"),
        "validation": ("Where can you see {it}?", "Whereabouts is {it}?", "Which part of the view is {it} in?"),
        "test": ("Where is {it} located?", "Which side is {it} on?", "Is {it} on the left or on the right?"),
    },
    "count": {
        "train": ("How many objects are there?", "How many are there?", "How many things do you see?",
                  "How many do you see?", "Count the objects.", "How many?",
                  "How many objects?", "How many objects are shown?", "How many are in it?",
                  "What number of objects is shown?", "Is there one object or more?", "How many shapes appear?"),
        "validation": ("How many objects can you count?", "How many can you spot?", "Tell me how many there are."),
        "test": ("How many objects do you see?", "Count them.", "How many things are there?"),
    },
    "motion": {
        "train": ("Which way does {it} move?", "How is {it} moving?", "Is {it} moving?", "What is {it} doing?",
                  "Where is {it} going?", "In which direction does {it} move?", "Where does {it} go?",
                  "Which direction does {it} go?", "What direction is {it} moving in?", "How does {it} move?",
                  "Is {it} moving left or right?", "Is {it} in motion?", "What way does {it} go?"),
        "validation": ("Which way is {it} heading?", "What direction does {it} travel?", "Where is {it} off to?"),
        "test": ("Which way is {it} going?", "Where does {it} move?", "Does {it} move?",
                 "In which direction is {it} going?"),
    },
    "describe": {
        "train": ("Describe it.", "Describe the scene.", "What do you see?", "Describe what you see.",
                  "Tell me about it.", "Can you describe it?", "Give me a description.",
                  "Describe everything.", "What is there?", "Explain what you see.",
                  "Sum up what you see.", "What does it show?", "Give me a full description."),
        "validation": ("Describe this.", "Give an account of what you see.", "What is in view?"),
        "test": ("Describe the object.", "What can you see?", "Please describe it.", "Tell me what you see."),
    },
}

# Questions that name the input, as people ask about a file they attached ("What shape does this text talk
# about?", "What colour is the object in the picture?"): ``draw(..., named=modality)``. The input's nouns are slot
# words shared by every part; the referents below stand in for ``{it}``, and the frames add to a part's own.
INPUT_NOUNS: dict[str, tuple[str, ...]] = {
    "image": ("picture", "image", "photo"),
    "video": ("video", "clip"),
    "text": ("text", "caption", "description"),
    "audio": ("sound", "recording", "audio"),
    "point": ("point cloud", "3D scan"),
    "depth": ("depth map",),
    "thermal": ("thermal image",),
    "imu": ("IMU trace", "sensor data"),
}
NAMED_IT = ("the object in the {input}", "the thing in this {input}")
NAMED_IT_TRAIN_ONLY = ("the one in the {input}", "the object this {input} shows")
NAMED_SHARED: dict[str, tuple[str, ...]] = {
    "train": ("What {noun} does the {input} show?", "What is the {noun} in this {input}?",
              "In the {input}, what is the {noun}?", "Tell me the {noun} from the {input}."),
    "validation": ("Looking at the {input}, what is the {noun}?", "What {noun} can you make out in this {input}?"),
    "test": ("Judging by the {input}, what is the {noun}?", "What {noun} does this {input} give?"),
}
NAMED_OWN: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": {"train": ("What object is in the {input}?", "What object does this {input} show?",
                        "Which shape is in the {input}?"),
              "validation": ("What kind of object does the {input} show?",),
              "test": ("What shape does this {input} talk about?",)},
    "colour": {"train": ("Which colour does the {input} show?", "What colour is in this {input}?"),
               "validation": ("What colour can you see in the {input}?",),
               "test": ("What colour does the {input} mention?",)},
    "size": {"train": ("Is the object in the {input} large or small?", "How big is it in the {input}?"),
             "validation": ("How large is the thing the {input} shows?",),
             "test": ("What size is shown in the {input}?",)},
    "position": {"train": ("Where in the {input} is it?", "Where is it in this {input}?"),
                 "validation": ("In which part of the {input} is it?",),
                 "test": ("Where in this {input} is the object?",)},
    "count": {"train": ("How many objects are in the {input}?", "How many things does the {input} show?"),
              "validation": ("How many objects does the {input} contain?",),
              "test": ("How many objects does this {input} show?",)},
    "motion": {"train": ("What motion does the {input} show?", "Which way does it move in the {input}?"),
               "validation": ("Which way is it moving in the {input}?",),
               "test": ("Where is it going in this {input}?",)},
    "describe": {"train": ("Describe the {input}.", "What is in the {input}?", "What does the {input} show?",
                           "Tell me about this {input}."),
                 "validation": ("Give me an account of the {input}.",),
                 "test": ("What does this {input} contain?", "Describe what the {input} shows.")},
}

_YES_NO_START = ("is ", "does ", "are ")  # not "do you know ...?": that asks for the value
_CHOICE = (" or ", )  # "Is it large or small?" is a choice, not a yes/no question


@dataclass(frozen=True)
class Template:
    latent: str
    text: str
    part: str

    @property
    def yes_no(self) -> bool:
        low = self.text.lower()
        return low.startswith(_YES_NO_START) and not any(c in low for c in _CHOICE)

    def phrasings(self, named: str | None = None) -> tuple[str, ...]:
        """Every question this template makes (each slot filled with each of its words); ``named``: a modality
        whose input the question names ("the object in the picture" for ``{it}``, its nouns for ``{input}``)."""
        nouns = NOUNS.get(self.latent, ("",))
        train = self.part == "train"
        if named is None:
            its = (*IT, *IT_TRAIN_ONLY) if train else IT
        else:
            its = tuple(r.format(input=n) for r in ((*NAMED_IT, *NAMED_IT_TRAIN_ONLY) if train else NAMED_IT)
                        for n in INPUT_NOUNS[named])
        inputs = INPUT_NOUNS[named] if named is not None and "{input}" in self.text else ("",)
        out = []
        for it, noun, input_noun in itertools.product(its if "{it}" in self.text else ("",),
                                                      nouns if "{noun}" in self.text.lower() else ("",), inputs):
            text = self.text.format(it=it, noun=noun, Noun=noun[:1].upper() + noun[1:], input=input_noun)
            out.append(text[0].upper() + text[1:])
        return tuple(dict.fromkeys(out))


def templates(latent: str, part: str, named: bool = False) -> tuple[Template, ...]:
    """The templates of ``part`` about ``latent``; ``named``: with the frames that name the input too."""
    if latent not in ASKED:
        raise ValueError(f"unknown latent {latent!r}; known: {ASKED}")
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; known: {PARTS}")
    shared = SHARED[part] if latent in NOUNS else ()
    texts = (*OWN[latent][part], *shared)
    if named:
        texts += (*NAMED_OWN[latent][part], *(NAMED_SHARED[part] if latent in NOUNS else ()))
    return tuple(Template(latent, t, part) for t in texts)


def phrasings(latent: str, part: str = "train", named: str | None = None) -> tuple[str, ...]:
    """Every question of ``part`` about ``latent``, in a fixed order (``named``: naming that modality's input)."""
    return tuple(q for t in templates(latent, part, named is not None) for q in t.phrasings(named))


def is_yes_no(question: str) -> bool:
    low = question.lower()
    return low.startswith(_YES_NO_START) and not any(c in low for c in _CHOICE)


# Words around a training question, as people add them ("OK, what colour is it now?"): a share of the drawn
# training questions get an opener or a closer, so that no frame word is a reliable cue and the word naming
# the latent has to be read. Yes/no questions take no opener: their first word decides the answer's form.
OPENERS = ("OK, ", "So, ", "Now, ", "Hey, ", "Right, ", "Next: ", "One more thing: ", "Quick question: ", "Look, ",
           "Hmm, ")
CLOSERS = (" here", " now", " in this one", " exactly", ", if you can", " this time", " then")
WRAP_FRACTION = 0.3


def wrap(question: str, rng: np.random.Generator) -> str:
    """``question`` with an opener (not for yes/no questions) or a closer before its end mark."""
    body, end = question[:-1], question[-1]
    if not is_yes_no(question) and rng.random() < 0.5:
        opener = OPENERS[int(rng.integers(len(OPENERS)))]
        return opener + body[0].lower() + body[1:] + end
    return body + CLOSERS[int(rng.integers(len(CLOSERS)))] + end


def unwrap(question: str) -> str:
    """``question`` without the opener or closer ``wrap`` may have added."""
    body, end = question[:-1], question[-1:]
    for opener in OPENERS:
        if body.startswith(opener):
            body = body[len(opener)].upper() + body[len(opener) + 1:]
            break
    for closer in CLOSERS:
        if body.endswith(closer):
            body = body[:-len(closer)]
            break
    return body + end


def draw(latent: str, rng: np.random.Generator, part: str = "train", named: str | None = None) -> str:
    """One question about ``latent``: a template of ``part`` at random, then its words at random (and, for the
    training part, at times wrapped in a few words of no meaning, ``wrap``). ``named``: the modality of the input
    the question names ("What colour is the object in the picture?"); templates without a slot for it stay as
    they are ("And its colour?")."""
    ts = templates(latent, part, named is not None)
    options = ts[int(rng.integers(len(ts)))].phrasings(named)
    question = options[int(rng.integers(len(options)))]
    if part == "train" and rng.random() < WRAP_FRACTION:
        return wrap(question, rng)
    return question


def part_of(question: str) -> str | None:
    """Which part of the grammar makes ``question`` (None: none does)."""
    for part in PARTS:
        if any(question in phrasings(latent, part) for latent in ASKED):
            return part
    return None


_ASKING = frozenset({"what", "which", "where", "how", "who", "why"})


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


@functools.cache
def key_words(part: str = "train") -> frozenset[str]:
    """Words that say which latent a question of ``part`` is about: every latent's noun, and every word that
    occurs in the phrasings of one asked latent only ("many", "big", "going"), and the question words ("how
    many" is not "how big"); "is", "the", "it", "tell me" say nothing of the latent."""
    where: dict[str, set[str]] = {}
    for latent in ASKED:
        for q in phrasings(latent, part):
            for w in _words(q):
                where.setdefault(w, set()).add(latent)
    nouns = {w for names in NOUNS.values() for name in names for w in _words(name)}
    return frozenset(nouns | _ASKING | {w for w, latents in where.items() if len(latents) == 1})


def drop_words(question: str, rng: np.random.Generator, p: float) -> str:
    """``question`` with each word that is not a ``key_words`` word left out with probability ``p``.

    Training on such questions makes the frame words ("Tell me the ...", "What is the ... of it?") matter less
    than the word that names the latent, so that an unseen frame around a known noun is still read right. Yes/no
    questions are left whole: their first word decides the answer's form."""
    if p <= 0 or is_yes_no(question):
        return question
    keys = key_words()
    tokens = question.rstrip("?.").split(" ")
    kept = [t for t in tokens if any(w in keys for w in _words(t)) or rng.random() >= p]
    text = " ".join(kept)
    if not kept or is_yes_no(text):  # "Where is it?" must not become "Is it?"
        return question
    return text[0].upper() + text[1:] + question[len(question.rstrip("?.")):]


@functools.cache
def _noun_words() -> dict[str, frozenset[str]]:
    """Per latent, the words of its names ("number of objects": number, objects)."""
    return {latent: frozenset(w for name in names for w in _words(name) if w != "of")
            for latent, names in NOUNS.items()}


@functools.cache
def _filler_words() -> tuple[str, ...]:
    """Words of the training phrasings that name no latent and cannot turn a question into a choice ("or")."""
    nouns = {w for words in _noun_words().values() for w in words}
    words = {w for latent in ASKED for q in phrasings(latent, "train") for w in _words(q)}
    return tuple(sorted(words - nouns - {"or"}))


def insert_words(question: str, latent: str, rng: np.random.Generator, p: float) -> str:
    """With probability ``p``, ``question`` with one or two words of the training phrasings put in at random
    places after its first word ("What colour is it?" -> "What colour going is it?"), when it names its latent.

    Unseen frames carry words, or word pieces, that cue another latent ("Which colour has it got?" is read by
    the tokenizer as "... ha s it go t?", and "go" means motion). Training on questions with such words strewn in
    teaches that the latent's name outranks every other word. Questions that do not name the latent ("Where is
    it going?") are left whole: there the other words are all there is to read."""
    nouns = _noun_words().get(latent)
    if p <= 0 or not nouns or rng.random() >= p:
        return question
    body, end = question.rstrip("?.").split(" "), question[len(question.rstrip("?.")):]
    if not any(w in nouns for t in body for w in _words(t)):
        return question
    fillers = _filler_words()
    for _ in range(int(rng.integers(1, 3))):
        body.insert(int(rng.integers(1, len(body) + 1)), fillers[int(rng.integers(len(fillers)))])
    return " ".join(body) + end
