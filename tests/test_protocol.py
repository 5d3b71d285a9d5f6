"""The one protocol: rendering, meta-prompts, cleaning, label parsing, scoring, sampling."""

from __future__ import annotations

import pytest

from dspy_promptmii.protocol import (
    PLACEHOLDERS,
    TEMPLATES,
    build_meta_prompt,
    check_template,
    clean_reply,
    field_title,
    follower_prompt,
    format_line,
    label_list,
    macro_f1,
    normalize_label,
    parse_label,
    render_example,
    render_examples,
    render_inputs,
    score,
    with_format_line,
)
from dspy_promptmii.sampling import example_order, select_examples

FORMAT_POS_NEG = 'Only return one of these options: pos, neg. Do not output "Label:" or any extra text.'


# --- format line and rendering ------------------------------------------------------


def test_format_line_is_the_paper_line_with_labels_as_strings():
    assert format_line(["pos", "neg"]) == FORMAT_POS_NEG
    assert format_line([0, 1, 2]) == (
        'Only return one of these options: 0, 1, 2. Do not output "Label:" or any extra text.'
    )
    assert label_list([True, False]) == "True, False"


def test_with_format_line_appends_once():
    once = with_format_line("Decide the sentiment.", ["pos", "neg"])
    assert once == "Decide the sentiment.\n" + FORMAT_POS_NEG
    assert with_format_line(once, ["pos", "neg"]) == once
    assert with_format_line(once + "\n\n", ["pos", "neg"]) == once
    assert with_format_line("", ["pos", "neg"]) == FORMAT_POS_NEG


def test_single_field_renders_as_input_and_pairs_by_field_name():
    assert render_inputs({"text": "great film"}, ["text"]) == "Input: great film"
    pair = render_inputs({"premise": "A man sleeps.", "hypothesis": "A man is awake."}, ["premise", "hypothesis"])
    assert pair == "Premise: A man sleeps.\nHypothesis: A man is awake."
    assert field_title("text_pair") == "Text pair"
    assert render_example({"text": "x"}, "pos", ["text"]) == "Input: x\nLabel: pos"
    assert render_examples([({"text": "a"}, "pos"), ({"text": "b"}, "neg")], ["text"]) == (
        "Input: a\nLabel: pos\n\nInput: b\nLabel: neg"
    )


# --- meta-prompt templates ----------------------------------------------------------


@pytest.mark.parametrize("name", ["meta1", "meta2"])
def test_templates_have_both_placeholders_and_about_ninety_words(name):
    text = TEMPLATES[name]
    for placeholder in PLACEHOLDERS:
        assert text.count(placeholder) == 1
    assert 60 <= len(text.split()) <= 130


def test_meta1_and_meta2_differ_in_kind():
    # meta1 writes a prompt for a model; meta2 writes guidelines for a human annotator.
    assert "model" in TEMPLATES["meta1"]
    assert "annotat" in TEMPLATES["meta2"] and "guidelines" in TEMPLATES["meta2"]
    assert TEMPLATES["meta1"] != TEMPLATES["meta2"]


def test_build_meta_prompt_fills_labels_and_examples_and_keeps_braces():
    examples = [({"text": "uses {braces} and {examples}"}, "pos"), ({"text": "plain"}, "neg")]
    prompt = build_meta_prompt("meta1", ["pos", "neg"], examples, ["text"])
    assert "{label_names}" not in prompt
    assert "pos, neg" in prompt
    # The example text is inserted once, verbatim, braces and all (no str.format).
    assert "Input: uses {braces} and {examples}\nLabel: pos\n\nInput: plain\nLabel: neg" in prompt
    assert prompt.startswith(TEMPLATES["meta1"].split("{label_names}")[0])


def test_custom_template_is_filled_verbatim():
    template = "L=[{label_names}]\n{examples}\nEND {other}"
    prompt = build_meta_prompt(template, [0, 1], [({"text": "a"}, "1")], ["text"])
    assert prompt == "L=[0, 1]\nInput: a\nLabel: 1\nEND {other}"


@pytest.mark.parametrize(
    ("template", "missing"),
    [("Write it from {examples}", "{label_names}"), ("Labels: {label_names}", "{examples}")],
)
def test_check_template_names_the_missing_placeholder(template, missing):
    with pytest.raises(ValueError) as info:
        check_template(template)
    named = str(info.value).split(";")[0]  # the part that says what is missing
    assert named == f"the template is missing the placeholder(s) {missing}"


def test_check_template_rejects_empty():
    with pytest.raises(ValueError, match="template"):
        check_template("   ")


# --- cleaning a generator reply -----------------------------------------------------

BODY = "Classify the sentiment of the review."


@pytest.mark.parametrize(
    "reply",
    [
        "Instruction:\n" + BODY,
        "Instruction: " + BODY,
        "**Instruction:** " + BODY,
        "Here is the instruction:\n\n" + BODY,
        "Sure! Here's a prompt for the model:\n" + BODY,
        "### Guidelines\n" + BODY,
        "```\n" + BODY + "\n```",
        "```text\n" + BODY + "\n```",
        '"' + BODY + '"',
        "\u201c" + BODY + "\u201d",
        "'" + BODY + "'",
        BODY + "\n\nInput: a great movie\nLabel: pos\n\nInput: a dull movie\nLabel: neg",
        BODY + "\n" + FORMAT_POS_NEG,
        BODY + "\nOnly return one of these options: pos, neg.",
        "Instruction:\n```\n\"" + BODY + "\"\n```\n" + FORMAT_POS_NEG,
    ],
)
def test_clean_reply_removes_wrapping(reply):
    assert clean_reply(reply).text == BODY


def test_clean_reply_cuts_a_copied_pair_example_by_field_name():
    reply = "Decide whether the hypothesis follows.\n\nPremise: A dog runs.\nHypothesis: An animal moves.\nLabel: yes"
    assert clean_reply(reply, ("premise", "hypothesis")).text == "Decide whether the hypothesis follows."


def test_clean_reply_keeps_a_normal_multi_paragraph_instruction():
    text = (
        "These guidelines explain how to label movie reviews.\n\n"
        "A review is positive when the writer recommends the film or praises it overall; "
        "it is negative when the writer would not recommend it.\n\n"
        "- Weigh the overall verdict, not single remarks.\n"
        "- Sarcastic praise counts as negative.\n\n"
        "Answer with the label only."
    )
    assert clean_reply(text).text == text
    assert clean_reply("  \n" + text + "\n\n").text == text


def test_clean_reply_keeps_a_title_like_first_sentence_without_header_form():
    # Names a header word ("prompt") but is neither a colon line, a heading, bold, nor "Here is".
    text = "Classify each prompt as positive or negative\nLook at the verbs."
    assert clean_reply(text).text == text


def test_clean_reply_keeps_an_illustrative_example_followed_by_prose():
    text = "Label the mood.\nFor example:\nInput: great film\nLabel: positive\nPraise means positive."
    assert clean_reply(text).text == text


def test_clean_reply_cuts_only_the_trailing_copy_of_examples():
    text = "Label the mood.\nInput: a\nLabel: positive\nPraise means positive.\n\nInput: b\nLabel: negative"
    assert clean_reply(text).text == "Label the mood.\nInput: a\nLabel: positive\nPraise means positive."


SHOWN = [
    ({"text": "give four stars to What the Day Owes the Night"}, "RateBook"),
    ({"text": "play some jazz"}, "PlayMusic"),
]
LABELS = ["PlayMusic", "RateBook", "SearchCreativeWork"]


def test_clean_reply_cuts_a_markdown_copy_of_the_shown_examples():
    reply = (
        "Label each request with its intent.\n\nExamples:\n\n"
        "1. **give four stars to What the Day Owes the Night**\n   - **Label**: RateBook\n\n"
        "2. **SearchCreativeWork**\n\n3. **play some jazz**"
    )
    assert clean_reply(reply, examples=SHOWN, labels=LABELS).text == "Label each request with its intent."
    # Without knowing what was shown, the numbered copy is not recognised as one.
    assert clean_reply(reply).text != "Label each request with its intent."
    annotated = (
        "Label each request with its intent.\n"
        "1. **give four stars to What the Day Owes the Night**:\n   - **Label**: RateBook\n"
        "   - **Reason**: it rates a book.\n2. **play some jazz**:\n   - **Reason**: music."
    )
    assert clean_reply(annotated, examples=SHOWN, labels=LABELS).text == "Label each request with its intent."


def test_clean_reply_drops_headings_left_with_nothing_after_them():
    reply = "Label the intent.\n\n#### Examples\n1. **find me a table for two**:"
    assert clean_reply(reply).text == "Label the intent."
    assert clean_reply("Intents:").text == "Intents:"  # never to nothing


def test_clean_reply_keeps_a_closing_list_of_label_names():
    reply = "Label each request with its intent.\nThe intents:\n- PlayMusic\n- RateBook\n- SearchCreativeWork"
    assert clean_reply(reply, examples=SHOWN, labels=LABELS).text == reply


def test_clean_reply_drops_lines_that_repeat_earlier_ones():
    looping = (
        "Label the intent.\n\nRules:\n1. Avoid X.\n2. Prefer Y.\n3. Avoid X.\n4. Prefer Y.\n"
        "- **Avoid X.**\n- Avoid  x.\n\n\n\nWatch Z."
    )
    expected = "Label the intent.\n\nRules:\n1. Avoid X.\n2. Prefer Y.\n- **Avoid X.**\n\nWatch Z."
    assert clean_reply(looping).text == expected


@pytest.mark.parametrize(
    "reply",
    [
        "Answer in at most 3 words: the label.",  # a short answer limit is for the follower
        "Write down nothing but the label.",
        "Reviews under 20 words are often neutral.\nThe guidelines of the venue decide borderline cases.",
        "Keep in mind reviews under 20 words are often sarcastic.",
        "Make the call from the first sentence; reviews under 30 words are usually negative.",
    ],
)
def test_clean_reply_keeps_sentences_meant_for_the_follower(reply):
    assert clean_reply(reply, examples=SHOWN, labels=LABELS).text == reply


@pytest.mark.parametrize(
    "reply",
    [
        '{"instruction": "Label each request with its intent.\\nPlayMusic asks for a song."}',
        '```json\n{"Guidelines": "Label each request with its intent.\\nPlayMusic asks for a song.", "n": 2}\n```',
        '{"answer": "Label each request with its intent.\\nPlayMusic asks for a song."}',
        '"Label each request with its intent.\\nPlayMusic asks for a song."',
    ],
)
def test_clean_reply_unwraps_an_instruction_sent_as_json(reply):
    assert clean_reply(reply).text == "Label each request with its intent.\nPlayMusic asks for a song."


def test_clean_reply_keeps_json_that_holds_no_single_instruction():
    reply = '{"PlayMusic": "asks for a song", "RateBook": "gives a score"}'
    assert clean_reply(reply).text == reply


def test_clean_reply_cuts_a_one_paragraph_reply_at_its_last_full_sentence_when_truncated():
    reply = "Label the intent. PlayMusic asks for a song. When the user men"
    assert clean_reply(reply, truncated=True).text == "Label the intent. PlayMusic asks for a song."
    assert clean_reply(reply).text == reply


def test_clean_reply_drops_an_unfinished_last_line_only_when_truncated():
    reply = "Label the intent.\nGet the weather for weather questions.\n- Overlapping: avoid the same"
    assert clean_reply(reply, truncated=True).text == "Label the intent.\nGet the weather for weather questions."
    assert clean_reply(reply).text == reply
    assert clean_reply("Label the intent and", truncated=True).text == "Label the intent and"  # never to nothing


@pytest.mark.parametrize("reply", [None, "", "   ", "Instruction:", "```\n```", '""', "**Guidelines**\n\n"])
def test_clean_reply_empty_when_nothing_is_left(reply):
    assert clean_reply(reply).text == ""


# --- label parsing ------------------------------------------------------------------

SENT = ["positive", "negative", "neutral"]
PARA = ["equivalent", "not_equivalent"]


@pytest.mark.parametrize(
    ("reply", "labels", "expected"),
    [
        ("positive", SENT, "positive"),  # exact
        ("Positive", SENT, "positive"),  # case
        ("NEGATIVE.", SENT, "negative"),  # case + trailing punctuation
        ('"neutral"', SENT, "neutral"),  # quotes
        ("'negative'", SENT, "negative"),
        ("`neutral`", SENT, "neutral"),
        ("(positive)", SENT, "positive"),
        ("Label: neutral", SENT, "neutral"),  # leading Label:
        ("label:negative", SENT, "negative"),
        ("**Label:** positive", SENT, "positive"),
        ("positive\nThe review praises the acting.", SENT, "positive"),  # first line only
        ("\n\n  negative  \nbecause", SENT, "negative"),
        ("not equivalent", PARA, "not_equivalent"),  # _ vs space
        ("Not-Equivalent", PARA, "not_equivalent"),
        ("not_equivalent", PARA, "not_equivalent"),
        ("equivalent", PARA, "equivalent"),
        ('{"label": "negative"}', SENT, "negative"),  # JSON (constrained decoding)
        ('{"label": "Neutral"}', SENT, "neutral"),
        ('{"label": 1}', [0, 1], "1"),
        ("1", [0, 1], "1"),  # int labels as strings
        ("true", [True, False], "True"),
        # invalid:
        ("I think it is positive", SENT, None),  # prose containing a label
        ("positive or negative", SENT, None),
        ("pos", SENT, None),  # a prefix is not a label
        ("Not Equivalent", ["not_equivalent", "not-equivalent"], None),  # ambiguous normalised match
        ('{"label": "x", "other": "y"}', SENT, None),
        ("", SENT, None),
        ("   \n  ", SENT, None),
        (None, SENT, None),
    ],
)
def test_parse_label(reply, labels, expected):
    assert parse_label(reply, labels) == expected


def test_exact_match_wins_over_ambiguous_normalisation():
    assert parse_label("not-equivalent", ["not_equivalent", "not-equivalent"]) == "not-equivalent"


def test_normalize_label():
    assert normalize_label("  **Not_Equivalent!** ") == "not equivalent"
    assert normalize_label("a -  b") == "a b"


def test_follower_prompt_layout():
    prompt = follower_prompt(
        "Decide the sentiment.", ["pos", "neg"], {"text": "fine"}, ["text"], demos=[({"text": "good"}, "pos")]
    )
    assert prompt == (
        "Decide the sentiment.\n" + FORMAT_POS_NEG + "\n\nInput: good\nLabel: pos\n\nInput: fine\nLabel:"
    )


# --- scoring ------------------------------------------------------------------------


def test_an_invalid_prediction_is_a_miss_not_a_class():
    gold = ["a", "a", "b", "b"]
    pred = ["a", None, "b", "a"]
    # Classes: a, b (an invalid reply is no class).
    # a: TP=1 (0), FP=1 (3), FN=1 (1, the invalid one) -> P=1/2, R=1/2, F1=1/2
    # b: TP=1 (2), FP=0,     FN=1 (3)                  -> P=1,   R=1/2, F1=2/3
    # macro = (1/2 + 2/3) / 2 = 7/12
    assert macro_f1(gold, pred) == pytest.approx(7 / 12)
    # Never silently a gold label: reading None as "a" would give (4/5 + 2/3) / 2 = 11/15.
    assert macro_f1(gold, ["a", "a", "b", "a"]) == pytest.approx(11 / 15)


def test_one_invalid_reply_in_a_hundred_is_no_cliff():
    gold = ["a"] * 50 + ["b"] * 50
    pred = [None] + ["a"] * 49 + ["b"] * 50
    # a: TP=49, FP=0, FN=1 -> F1 = 98/99; b: F1 = 1 -> macro = (98/99 + 1) / 2 = 0.99495
    assert macro_f1(gold, pred) == pytest.approx((98 / 99 + 1) / 2)
    assert macro_f1(gold, pred) > 0.99  # scored as its own class it was 0.66


def test_a_predicted_label_absent_from_gold_counts_with_f1_zero():
    # A reward set of m=20 where the follower says "c", a label of the task that no test
    # example has: c enters the average with F1 0; labels nobody predicted or has don't.
    gold = ["a"] * 10 + ["b"] * 10
    pred = ["a"] * 8 + ["c"] * 2 + ["b"] * 9 + [None]
    # a: TP=8, FP=0, FN=2 -> 16/18; b: TP=9, FP=0, FN=1 -> 18/19; c: TP=0, FP=2 -> 0
    expected = (16 / 18 + 18 / 19 + 0) / 3
    assert macro_f1(gold, pred) == pytest.approx(expected)
    result = score(gold, pred)
    assert result["accuracy"] == pytest.approx(17 / 20)
    assert result["invalid_rate"] == pytest.approx(1 / 20)


def test_invalid_is_wrong_even_against_the_first_label():
    assert macro_f1(["0", "0"], [None, None]) == 0.0
    assert macro_f1([0, 1], ["0", "1"]) == 1.0  # gold given as ints is compared as strings


def test_score_reports_accuracy_and_invalid_rate():
    result = score(["a", "a", "b", "b"], ["a", None, "b", "a"])
    assert result["macro_f1"] == pytest.approx(7 / 12)
    assert result["accuracy"] == pytest.approx(2 / 4)
    assert result["invalid_rate"] == pytest.approx(1 / 4)
    assert result["n"] == 4


def test_macro_f1_rejects_mismatched_or_empty():
    with pytest.raises(ValueError, match="2 labels but there are 1"):
        macro_f1(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        macro_f1([], [])


# --- sampling -----------------------------------------------------------------------


def _labelled(counts: dict[str, int]):
    return [({"text": f"{label}-{i}"}, label) for label, k in counts.items() for i in range(k)]


UNBALANCED = _labelled({"a": 30, "b": 5, "c": 2, "d": 1})


@pytest.mark.parametrize("seed", range(10))
def test_stratified_covers_every_label_when_n_allows(seed):
    for n in (4, 5, 9):
        chosen = select_examples(UNBALANCED, n, seed, "stratified")
        assert len(chosen) == n
        assert {label for _, label in chosen} == {"a", "b", "c", "d"}


def test_random_sampling_can_miss_labels():
    # Without stratification, 4 of these 38 examples usually miss the single "d".
    misses = sum("d" not in {lab for _, lab in select_examples(UNBALANCED, 4, s, "random")} for s in range(20))
    assert misses > 0


@pytest.mark.parametrize("sampling", ["stratified", "random"])
def test_sampling_is_seeded(sampling):
    first = select_examples(UNBALANCED, 10, 7, sampling)
    assert select_examples(UNBALANCED, 10, 7, sampling) == first
    others = [select_examples(UNBALANCED, 10, seed, sampling) for seed in range(8, 14)]
    assert any(other != first for other in others)


@pytest.mark.parametrize("sampling", ["stratified", "random"])
@pytest.mark.parametrize("seed", [0, 1, 123])
def test_smaller_n_is_a_prefix_of_larger_n(sampling, seed):
    largest = select_examples(UNBALANCED, 30, seed, sampling)
    for n in (1, 3, 4, 10, 20):
        assert select_examples(UNBALANCED, n, seed, sampling) == largest[:n]


def test_example_order_is_a_permutation_and_n_beyond_size_takes_all():
    labels = [label for _, label in UNBALANCED]
    for sampling in ("stratified", "random"):
        assert sorted(example_order(labels, 3, sampling)) == list(range(len(labels)))
    assert len(select_examples(UNBALANCED, 1000, 0)) == len(UNBALANCED)


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be at least 1"):
        select_examples(UNBALANCED, 0, 0)
    with pytest.raises(ValueError, match="sampling must be one of"):
        example_order(["a"], 0, "balanced")
