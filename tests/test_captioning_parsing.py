"""MCoT prompts (versions, levels, limits) and the answer parser's extraction and checks."""

from __future__ import annotations

import hashlib
import json

import pytest

from captioning.parsing import ParseError, check_caption, parse_answer
from captioning.prompts import DOMAINS, LEVELS, PromptSpec, domain_for
from csmcir.errors import ConfigError

SPEC = PromptSpec("fashion", max_words=12)
GOOD = {
    "global": "a dress",
    "attributes": "red, cotton",
    "details": "white buttons",
    "Final_Caption": "a red cotton dress with white buttons",
}

# sha256 of every rendered default prompt. A template edit must bump its revision; then update
# these digests in the same commit.
PROMPT_DIGESTS = {
    "fashion": "e8f5aafb02d5",
    "scene": "f7566daf3195",
    "synthetic": "98f74840b714",
}


def digest(spec: PromptSpec) -> str:
    prompt = spec.render()
    return hashlib.sha256(f"{prompt.system}\n{prompt.user}".encode()).hexdigest()[:12]


@pytest.mark.parametrize("domain", list(DOMAINS))
def test_prompt_text_is_pinned_to_its_revision(domain):
    spec = PromptSpec(domain)
    assert spec.version == f"{domain}/mcot-r1/global+attributes+details/w25"
    assert digest(spec) == PROMPT_DIGESTS[domain], f"{domain} template changed: bump revision"


def test_prompt_asks_for_levels_in_order_json_and_the_word_limit():
    user = PromptSpec("scene", levels=("details", "global"), max_words=17).render().user
    assert user.index('1. "details"') < user.index('2. "global"')
    assert '"attributes"' not in user
    assert '"details", "global", "Final_Caption"' in user
    assert "at most 17 words" in user and "JSON" in user


def test_plain_style_has_no_levels_and_its_own_version():
    spec = PromptSpec("synthetic", style="plain", levels=("global",))
    assert spec.levels == ()
    assert spec.version == "synthetic/plain-r1/none/w25"
    assert '"global"' not in spec.render().user


def test_versions_differ_per_setting():
    versions = {
        PromptSpec(d, s, lv, w).version
        for d in DOMAINS
        for s in ("mcot", "plain")
        for lv in (LEVELS, ("global",))
        for w in (20, 25)
    }
    assert len(versions) == len(DOMAINS) * 2 * 2 * 2 - len(DOMAINS) * 2  # plain ignores levels


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domain": "food"}, "--domain"),
        ({"domain": "scene", "style": "fancy"}, "--style"),
        ({"domain": "scene", "levels": ("global", "colour")}, "unknown level"),
        ({"domain": "scene", "levels": ("global", "global")}, "twice"),
        ({"domain": "scene", "levels": ()}, "empty"),
        ({"domain": "scene", "max_words": 2}, "--max-words"),
    ],
)
def test_bad_prompt_settings_name_the_flag(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PromptSpec(**kwargs)


def test_benchmark_domains():
    assert [domain_for(b) for b in ("fashioniq", "shoes", "cirr", "circo", "synthcir")] == [
        "fashion",
        "fashion",
        "scene",
        "scene",
        "synthetic",
    ]
    with pytest.raises(ConfigError, match="--domain"):
        domain_for("mystery")


def test_plain_json():
    cap = parse_answer(json.dumps(GOOD), SPEC)
    assert cap.final == "a red cotton dress with white buttons"
    assert cap.levels == {k: v for k, v in GOOD.items() if k != "Final_Caption"}
    assert cap.missing_levels == ()


def test_json_in_code_fence_with_prose_around():
    fenced = f"```json\n{json.dumps(GOOD, indent=2)}\n```"
    text = f"Sure! Here is the analysis:\n{fenced}\nHope it helps."
    assert parse_answer(text, SPEC).final == GOOD["Final_Caption"]


def test_json_after_prose_with_braces_in_strings_and_a_stray_object_before():
    answer = dict(GOOD, details="a {curly} logo")
    text = 'I considered {"note": 1} first. Answer: ' + json.dumps(answer) + " done"
    cap = parse_answer(text, SPEC)
    assert cap.levels["details"] == "a {curly} logo"
    assert cap.final == GOOD["Final_Caption"]


def test_trailing_commas_single_quotes_and_smart_quotes_are_repaired():
    trailing = '{"global": "a dress", "Final_Caption": "a red dress with buttons",}'
    single = "{'global': 'a dress', 'Final_Caption': 'a red dress with buttons'}"
    smart = "{“global”: “a dress”, “Final_Caption”: “a red dress with buttons”}"
    for text in (trailing, single, smart):
        assert parse_answer(text, SPEC).final == "a red dress with buttons"


def test_key_variants_nested_levels_and_structured_values():
    text = json.dumps(
        {
            "levels": {"Global Level": "a shirt", "salient_attributes": ["blue", "striped"]},
            "Discriminative details": {"collar": "white", "pocket": "one"},
            "final caption": "  a blue striped shirt\nwith a white collar ",
        }
    )
    cap = parse_answer(text, SPEC)
    assert cap.final == "a blue striped shirt with a white collar"
    assert cap.levels == {
        "global": "a shirt",
        "attributes": "blue; striped",
        "details": "collar: white; pocket: one",
    }


def test_an_answer_wrapped_in_an_envelope_object():
    text = json.dumps({"response": {"analysis": GOOD}, "confidence": 0.9})
    cap = parse_answer(text, SPEC)
    assert cap.final == GOOD["Final_Caption"] and cap.levels["details"] == "white buttons"


def test_missing_levels_are_recorded_not_invented():
    cap = parse_answer('{"global": "a dress", "Final_Caption": "a long red dress"}', SPEC)
    assert cap.levels == {"global": "a dress"}
    assert cap.missing_levels == ("attributes", "details")


def test_markdown_lines_without_json():
    text = '**Global:** a dress\n**Attributes:** red\n2. **Final Caption:** "a short red dress"'
    cap = parse_answer(text, SPEC)
    assert cap.final == "a short red dress"
    assert cap.levels == {"global": "a dress", "attributes": "red"}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty answer"),
        ("   \n", "empty answer"),
        ("The image shows a red dress.", "no JSON object"),
        ('{"global": "a dress", "attributes": "red"}', "no Final_Caption key"),
        ('{"global": "a dress", "Final_Caption": "a red dre', "no JSON object"),
        ('{"Final_Caption": ""}', "is empty"),
        ('{"Final_Caption": ["a", "red dress"]}', "not a string"),
        ('{"Final_Caption": "一条红色的连衣裙，带白色纽扣"}', "not in English"),
        ('{"Final_Caption": "красное платье с белыми пуговицами"}', "not in English"),
        ('{"Final_Caption": "' + " ".join(["word"] * 7 + ["x"] * 6) + '"}', "too long: 13 words"),
        ('{"Final_Caption": "dress"}', "fewer than two words"),
        ('{"Final_Caption": "<one sentence, at most 12 words>"}', "placeholder"),
        ('{"Final_Caption": "a red red red dress"}', "repeats 'red'"),
        ('{"Final_Caption": "a dress with dots with dots with dots"}', "repeats 'with dots'"),
    ],
)
def test_unusable_answers_fail_with_their_reason(text, reason):
    with pytest.raises(ParseError, match=reason):
        parse_answer(text, SPEC)


def test_word_limit_is_inclusive_and_accents_are_english_enough():
    check_caption(" ".join(f"w{i}" for i in range(12)), 12)
    check_caption("a beige café-style blouse with a naïve print", 12)
    with pytest.raises(ParseError, match="too long"):
        check_caption(" ".join(f"w{i}" for i in range(13)), 12)
