"""The question grammar, the honest "cannot tell" answers, the strict judge and the stage-2 dialogues."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ibllm.llm.prompt import build_chat_prompt
from ibllm.llm.tokenizer import Tokenizer
from ibllm.train import toyworld as tw
from ibllm.train.language import TextMaker
from tests.conftest import REPO

TOY_TOKENIZER = REPO / "assets" / "toy" / "tokenizer.model"
WORD = re.compile(r"[a-z']+")


def _words(texts: list[str] | tuple[str, ...]) -> set[str]:
    return {w for t in texts for w in WORD.findall(t.lower())}


@pytest.mark.parametrize("latent", tw.ASKED)
def test_parts_of_the_grammar_share_no_template_and_no_phrasing(latent: str) -> None:
    parts = {p: tw.phrasings(latent, p) for p in tw.PARTS}
    templates = {p: {t.text for t in tw.templates(latent, p)} for p in tw.PARTS}
    for a in tw.PARTS:
        assert parts[a], (latent, a)
        for b in tw.PARTS:
            if a < b:
                assert not set(parts[a]) & set(parts[b]), (latent, a, b)
                assert not templates[a] & templates[b], (latent, a, b)
    for q in parts["test"]:
        assert tw.part_of(q) == "test"


def test_every_latent_noun_of_the_held_out_part_is_one_training_uses() -> None:
    """Held out are whole frames: the slot words (the latents' nouns, the referents) are the training ones."""
    train = _words([q for latent in tw.ASKED for q in tw.phrasings(latent, "train")])
    assert _words([n for nouns in tw.NOUNS.values() for n in nouns] + list(tw.IT)) <= train
    test = _words([q for latent in tw.ASKED for q in tw.phrasings(latent, "test")])
    assert 0 < len(test - train) <= 8, test - train  # a few words of the frames' own ("please", "located")


def test_the_grammar_says_things_several_ways() -> None:
    colour = tw.phrasings("colour")
    assert any("color" in q for q in colour) and any("colour" in q for q in colour)
    assert "Colour?" in colour and "And its shape?" in tw.phrasings("shape")
    assert "Where is it going?" in tw.phrasings("motion") and "How many do you see?" in tw.phrasings("count")
    assert any("the object" in q for q in tw.phrasings("shape"))
    assert all(len(tw.phrasings(latent)) >= 7 for latent in tw.ASKED)


def test_draw_stays_in_its_part() -> None:
    rng = np.random.default_rng(0)
    for part in tw.PARTS:
        for latent in tw.ASKED:
            allowed = set(tw.phrasings(latent, part))
            assert all(tw.unwrap(tw.draw(latent, rng, part)) in allowed for _ in range(20))


def test_training_questions_are_at_times_wrapped_in_words_of_no_meaning() -> None:
    """An opener or a closer around a training question ("OK, what colour is it now?"); yes/no questions keep
    their first word (it decides the answer's form), and the held-out parts are never wrapped."""
    rng = np.random.default_rng(0)
    wrapped = 0
    for latent in tw.ASKED:
        allowed = set(tw.phrasings(latent))
        for _ in range(200):
            q = tw.draw(latent, rng)
            assert tw.unwrap(q) in allowed, q
            assert tw.is_yes_no(q) == tw.is_yes_no(tw.unwrap(q)), q
            wrapped += q != tw.unwrap(q)
    assert 0.2 < wrapped / (200 * len(tw.ASKED)) < 0.4
    held_out = {q for part in ("validation", "test") for latent in tw.ASKED for q in tw.phrasings(latent, part)}
    for part in ("validation", "test"):
        for latent in tw.ASKED:
            allowed = set(tw.phrasings(latent, part))
            assert all(tw.draw(latent, rng, part) in allowed for _ in range(50))
    for q in (q for latent in tw.ASKED for q in tw.phrasings(latent)):  # no wrapping makes a held-out question
        body, end = q[:-1], q[-1]
        forms = [o + body[0].lower() + body[1:] + end for o in tw.OPENERS] + [body + c + end for c in tw.CLOSERS]
        assert not set(forms) & held_out, (q, set(forms) & held_out)
        assert all(tw.unwrap(f) == q for f in forms), q


def test_word_dropout_keeps_the_words_that_name_the_latent() -> None:
    keys = tw.key_words()
    assert {"shape", "colour", "color", "size", "many", "big", "where", "how"} <= keys
    assert not {"is", "the", "it", "tell", "me", "you"} & keys  # said of every latent alike
    rng = np.random.default_rng(0)
    changed = 0
    for latent in tw.ASKED:
        for q in tw.phrasings(latent):
            assert tw.drop_words(q, rng, 0.0) == q
            bare = tw.drop_words(q, rng, 1.0)  # only the key words (and the end mark) are left
            if tw.is_yes_no(q):
                assert bare == q  # its first word decides the answer's form
                continue
            assert not tw.is_yes_no(bare) and bare[-1] == q[-1]
            if bare != q:  # every key word kept, and only words that hold one ("what's" holds "what")
                def split(text: str) -> list[set[str]]:
                    return [set(re.findall("[a-z]+", w.lower())) for w in text.rstrip("?.").split(" ")]
                assert all(w & keys for w in split(bare)), (q, bare)
                assert set().union(*split(q)) & keys <= set().union(*split(bare)), (q, bare)
            changed += bare != q
    assert changed > 50
    assert tw.drop_words("Tell me the colour of the thing.", rng, 1.0) == "Colour of."


def test_inserted_words_never_name_a_latent_or_change_the_answer_form() -> None:
    nouns = {w for names in tw.NOUNS.values() for name in names for w in WORD.findall(name)} - {"of"}
    rng = np.random.default_rng(1)
    changed = 0
    for latent in tw.ASKED:
        for q in tw.phrasings(latent):
            assert tw.insert_words(q, latent, rng, 0.0) == q
            out = tw.insert_words(q, latent, rng, 1.0)
            names_it = bool(set(WORD.findall(q.lower())) & {w for n in tw.NOUNS.get(latent, ()) for w in
                                                             WORD.findall(n)} - {"of"})
            if not names_it:
                assert out == q, (q, out)  # nothing but the frame says what is asked: left whole
                continue
            before, after = q.rstrip("?.").split(" "), out.rstrip("?.").split(" ")
            assert after[0] == before[0] and out[-1] == q[-1] and 1 <= len(after) - len(before) <= 2, (q, out)
            added = list(after)
            for w in before:  # the original words, in order, with the new ones between them
                added.remove(w)
            assert not {w for a in added for w in WORD.findall(a.lower())} & (nouns | {"or"}), (q, out)
            assert tw.is_yes_no(out) == tw.is_yes_no(q), (q, out)
            changed += 1
    assert changed > 100


@pytest.mark.parametrize(("question", "yes_no"), [
    ("Is it moving?", True), ("Does the object move?", True), ("Is it large or small?", False),
    ("Is it on the left, in the centre or on the right?", False), ("Do you know the colour of it?", False),
    ("Which way does it move?", False)])
def test_yes_no_questions(question: str, yes_no: bool) -> None:
    assert tw.is_yes_no(question) is yes_no
    scene = tw.Scene("cube", "red", "large", "left", 1, "still")
    answer = tw.answer_for(scene, "motion", "text", question)
    assert answer.startswith("No,") is yes_no


@pytest.mark.parametrize("modality", ["point", "audio", "depth", "thermal", "imu"])
def test_cannot_tell_what_the_input_does_not_carry(modality: str) -> None:
    scene = tw.Scene("torus", "blue", "small", "right", 1, "up")
    for latent in tw.LATENTS:
        answer = tw.answer_for(scene, latent, modality, "What about it?")
        carried = latent in tw.CARRIES[modality]
        assert ("cannot tell" in answer) is not carried, answer
        assert tw.judge(answer, scene, latent, modality), (latent, answer)
        if not carried:  # names what it can tell, and no value of what it cannot
            assert all(name in answer for name in ("shape", "motion") if name in tw.CARRIES[modality])
            guess = tw.answer_for(scene, latent, "image")
            assert not tw.judge(guess, scene, latent, modality), guess


def test_the_strict_judge_refuses_a_second_value() -> None:
    scene = tw.Scene("cone", "green", "small", "left", 1, "right")
    assert tw.judge("It is green.", scene, "colour")
    assert not tw.judge("It is green and red.", scene, "colour")
    assert tw.judge("It is on the left.", scene, "position")
    assert not tw.judge("It is moving left.", scene, "position")
    assert not tw.judge("It is on the left or on the right.", scene, "position")
    assert tw.judge("A small green cone on the left, moving right.", scene, "describe")
    assert not tw.judge("A small green cone on the right, moving right.", scene, "describe")
    assert tw.judge("A cone, moving right.", scene, "describe", ("shape", "motion"))


def test_a_mix_takes_each_latent_from_the_input_that_carries_it() -> None:
    a = tw.Scene("cube", "red", "large", "left", 1, "left")
    b = tw.Scene("torus", "blue", "small", "centre", 3, "up")
    scene, carried = tw.mixed_scene([(a, "point"), (b, "imu")])
    assert carried == ("shape", "motion") and (scene.shape, scene.motion) == ("cube", "up")
    assert tw.answer_for(scene, "describe", carried) == "A cube moving up."
    assert "cannot tell" in tw.answer_for(scene, "colour", carried)
    scene, carried = tw.mixed_scene([(b, "depth"), (a, "imu")])
    assert (scene.count, scene.position, scene.motion) == (3, "centre", "left")


def _scenes(n: int) -> list[tw.Scene]:
    rng = np.random.default_rng(1)
    return [tw.sample_scene(rng, "train") for _ in range(n)]


def _latent_of(question: str) -> str:
    (latent,) = [n for n in tw.ASKED if tw.unwrap(question) in tw.QUESTIONS[n]]
    return latent


@pytest.mark.skipif(not TOY_TOKENIZER.is_file(), reason="the shipped toy tokenizer is absent")
@pytest.mark.parametrize("view", ["image", "imu", "point", "depth"])
def test_stage2_dialogues_are_prompted_as_the_chat_prompts(view: str) -> None:
    """Every example is the chat's own prompt (build_chat_prompt) of earlier turns about other latents, answered
    in the model's style, and a training-part question about the same inputs, answered as the view allows."""
    tok = Tokenizer(TOY_TOKENIZER)
    scenes = _scenes(6)
    maker = TextMaker(tok, [{"scene": s, "caption_variants": [tw.caption_for(s)]} for s in scenes], seed=0)
    lengths = set()
    refused = 0
    for k in range(60):
        i = k % len(scenes)
        ex = maker.qa(i, i, view=view, mix=maker.mix_for(view, len(scenes)))
        scene, carried = maker.scene_as(i, view, ex.mix)
        text = tok.decode(ex.prompt)
        question = text.split("### Instruction:")[1].split("###")[0].strip()
        # (the toy tokenizer normalises newlines to spaces, so the transcript is split on its markers)
        transcript = text.split("### Input:")[1].split("### Response:")[0] if "### Input:" in text else ""
        turns = re.findall(r"User: (.*?)\s+Assistant: (.*?)(?=\s+User: |\s*$)", transcript.strip())
        assert ex.prompt == build_chat_prompt(question, turns, tok, 10_000).ids
        asked = [_latent_of(q) for q, _ in turns] + [_latent_of(question)]
        for k, latent in enumerate(asked):  # a latent comes back only once everything the inputs carry was asked
            assert latent not in asked[:k] or {*carried, "describe"} <= set(asked[:k]), asked
        for (q, a), latent in zip([*turns, (question, tok.decode(ex.answer[:-1]))], asked, strict=True):
            assert a == tw.answer_for(scene, latent, carried, q)
        lengths.add(len(turns))
        refused += "cannot tell" in tok.decode(ex.answer)
    assert lengths == {0, 1, 2, 3}
    assert (refused > 0) is (view != "image")


@pytest.mark.parametrize("latent", tw.ASKED)
def test_questions_that_name_the_input_keep_their_parts_apart(latent: str) -> None:
    for modality, nouns in tw.INPUT_NOUNS.items():
        parts = {p: set(tw.phrasings(latent, p, named=modality)) for p in tw.PARTS}
        for a in tw.PARTS:
            for b in tw.PARTS:
                if a < b:
                    assert not parts[a] & parts[b], (latent, modality, a, b)
        named_only = parts["test"] - set(tw.phrasings(latent, "test"))
        assert named_only and all(any(n in q for n in nouns) for q in named_only), (latent, modality)
    # the plain questions, which every earlier figure was measured with, do not change
    assert "What shape does this text talk about?" in tw.phrasings("shape", "test", named="text")
    assert "What shape does this text talk about?" not in tw.phrasings("shape", "test")


@pytest.mark.skipif(not TOY_TOKENIZER.is_file(), reason="the shipped toy tokenizer is absent")
@pytest.mark.parametrize(("view", "own", "others"), [
    ("audio", ("sound", "recording", "audio"), ("video", "text", "IMU", "point cloud", "thermal", "photo")),
    ("image", ("picture", "image", "photo", "video", "clip", "text", "caption", "description"),
     ("sound", "recording", "IMU", "point cloud", "depth map", "thermal")),
])
def test_stage2_questions_name_the_input_by_what_it_stands_for(view: str, own: tuple[str, ...],
                                                               others: tuple[str, ...]) -> None:
    tok = Tokenizer(TOY_TOKENIZER)
    scenes = _scenes(6)
    records = [{"scene": s, "caption_variants": [tw.caption_for(s)]} for s in scenes]

    def texts(named_fraction: float) -> list[str]:  # the questions and earlier turns, without Alpaca's header
        maker = TextMaker(tok, records, seed=0, named_fraction=named_fraction)
        return [tok.decode(maker.qa(k % 6, k % 6, view=view).prompt).split("### Instruction:")[-1]
                for k in range(80)]

    def says(text: str, words: tuple[str, ...]) -> bool:
        return any(re.search(rf"\b{w}\b", text) for w in words)

    named, plain = texts(1.0), texts(0.0)
    assert sum(says(t, own) for t in named) > 40
    assert not any(says(t, others) for t in named)
    assert not any(says(t, ("sound", "recording", "clip", "caption")) for t in plain)
