"""Answer extraction, the in-process equality check, the guards and the reward."""

import pytest

from policies.verify.answer_guard import GuardConfig, refusal
from policies.verify.reward import RewardConfig, reward
from policies.verify.verifier import extract_boxed, gold_answers, is_correct


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{2}}{\\left(1+{x}\\right)}}", "\\frac{\\sqrt{2}}{\\left(1+{x}\\right)}"),
        ("first \\boxed{1}, then \\boxed{2}", "2"),
        ("\\boxed{1} and finally \\fbox{7}", "7"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed 5 is it", "5"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\begin{pmatrix}1\\\\{2}\\end{pmatrix}}", "\\begin{pmatrix}1\\\\{2}\\end{pmatrix}"),
        ("\\boxed{}", ""),
        ("no box here: 42", None),
        ("\\boxed{\\frac{1}{2}", None),  # unbalanced: cut off mid-answer
        ("\\boxed{1} then \\boxed{2", None),  # the last box is the final answer, and it is broken
        ("\\boxedx", None),
        ("trailing \\boxed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_deep_and_long_inputs_are_fast():
    deep = "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}"
    assert extract_boxed(deep) == "{" * 10_000 + "1" + "}" * 10_000
    assert extract_boxed("x" * 1_000_000 + "\\boxed{3}") == "3"
    assert extract_boxed("\\boxed{" + "1" * 1_000_000) is None


def test_extract_boxed_rejects_non_str():
    with pytest.raises(TypeError, match="text must be str"):
        extract_boxed(42)


def B(ans: str) -> str:
    return "Let me think step by step. ... Therefore the answer is $\\boxed{" + ans + "}$."


CASES = [
    # fractions, decimals, \dfrac
    ("\\frac{1}{2}", "0.5", True),
    ("\\frac{1}{2}", "0.6", False),
    ("\\dfrac{1}{2}", "\\tfrac12", True),
    ("1/2", "\\frac{1}{2}", True),
    ("\\frac{1}{3}", "0.333", False),
    ("\\frac13", "0.3333333", True),
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\frac{3}{4}", "\\frac{6}{8}", True),
    # percents: X% equals X and X/100
    ("50\\%", "50", True),
    ("50\\%", "0.5", True),
    ("50", "50\\%", True),
    ("0.5", "50\\%", True),
    ("0.5", "50", False),
    ("50\\%", "40\\%", False),
    # degrees
    ("30^\\circ", "30", True),
    ("30", "30^{\\circ}", True),
    ("30", "30\\degree", True),
    ("30", "30°", True),
    ("30", "31^\\circ", False),
    # units text, currency
    ("5", "5\\text{ cm}", True),
    ("5\\text{ cm}", "5", True),
    ("5", "5 dollars", True),
    ("5", "\\$5", True),
    ("12", "12\\ \\text{cm}^2", True),
    ("12", "12 square units", True),
    ("5", "6 dollars", False),
    # intervals
    ("[1,2)", "[1,2)", True),
    ("[1,2)", "[1,2]", False),
    ("(-\\infty, 3]", "(-\\infty,3]", True),
    ("(-\\infty, 3]", "(-\\infty,3)", False),
    # sets and tuples
    ("\\{1,2\\}", "\\{2,1\\}", True),
    ("\\{1,2\\}", "\\{1,3\\}", False),
    ("(1, 2)", "\\left(1,2\\right)", True),
    ("(1,2)", "(2,1)", False),
    # matrices
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&4\\end{bmatrix}", True),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{bmatrix}1&2\\\\3&5\\end{bmatrix}", False),
    # negative numbers
    ("-3", "-3", True),
    ("-3", "3", False),
    ("3", "-3", False),
    # thousands separators
    ("1000", "1,000", True),
    ("1000", "1{,}000", True),
    ("1000", "1\\,000", True),
    ("1,000,000", "1000000", True),
    ("1000", "1,001", False),
    ("1000000", "1,000", False),
    ("12", "(1,2)", False),
    # plain text
    ("\\text{Monday}", "monday", True),
    ("Monday", "\\text{Tuesday}", False),
    ("yes", "sey", False),  # as sympy symbols these would be equal products
    ("\\text{(C)}", "C", True),
    ("C", "D", False),
    # expressions
    ("x^2+1", "1+x^2", True),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt2}", True),
    ("2\\sqrt{3}", "\\sqrt{12}", True),
    ("2\\sqrt{3}", "\\sqrt{13}", False),
    ("2x", "2", False),
    ("3", "x=3", True),
    ("\\infty", "infinity", True),
    ("10^{10}", "10000000000", True),
    ("\\pi", "3.14", False),
]


@pytest.mark.parametrize("reference, answer, expected", CASES)
def test_is_correct_table(reference, answer, expected):
    assert is_correct(B(answer), reference) is expected


def test_missing_or_broken_box_is_wrong():
    assert not is_correct("The answer is 42.", "42")
    assert not is_correct("\\boxed{42", "42")
    assert not is_correct("\\boxed{}", "42")
    assert not is_correct("\\boxed{  }", "")


def test_last_box_is_the_answer():
    assert is_correct("\\boxed{41} no wait, \\boxed{42}", "42")
    assert not is_correct("\\boxed{42} no wait, \\boxed{41}", "42")


def test_reference_forms():
    # a list of acceptable answers
    assert is_correct(B("\\frac{1}{2}"), ["0.5", "50\\%"])
    assert not is_correct(B("0.4"), ["0.5", "50\\%"])
    # a worked solution counts by its boxed answer
    solution = "We compute 3+4 = 7, and 7 \\cdot 2 = 14. So the result is \\boxed{14}."
    assert is_correct(B("14"), solution)
    assert not is_correct(B("7"), solution)
    assert gold_answers([solution, "fourteen"]) == ["14", "fourteen"]


@pytest.mark.parametrize("bad", [42, [], [1, 2], None])
def test_bad_reference_is_named(bad):
    with pytest.raises(TypeError, match="reference"):
        is_correct(B("1"), bad)


def test_bad_response_is_named():
    with pytest.raises(TypeError, match="response must be str"):
        is_correct(None, "1")


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("9^{9^{9^{9^{9}}}}", "power"),
        ("9^{9^{9}}", "power"),
        ("9**9**9", "power"),
        ("10^{10^{10}}", "power"),
        ("7^{123456789}", "power"),
        ("{" * 100 + "1" + "}" * 100, "nests"),
        ("1" * 5000, "chars"),
        ("100000!", "factorial"),
        ("x" * 1500, "symbols"),
        ("1+" * 500 + "1", "symbols"),
    ],
)
def test_guard_refuses_costly_answers(answer, reason):
    assert reason in refusal(answer)
    assert not is_correct(B(answer), "5")


@pytest.mark.parametrize(
    "answer", ["2^{10}", "10^{10}", "2^{2^{2^{2}}}", "x^2+1", "30^{\\circ}", "e^{i\\pi}", "5!", "2^{1000}", "10^{-5}"]
)
def test_guard_lets_ordinary_answers_through(answer):
    assert refusal(answer) is None


def test_guard_config_validation():
    with pytest.raises(ValueError, match="max_chars"):
        GuardConfig(max_chars=0)
    assert "chars" in refusal("1" * 11, GuardConfig(max_chars=10))


def test_reward_default_and_custom():
    assert reward(True) == 5.0 and reward(False) == -5.0
    cfg = RewardConfig(correct=1.0, wrong=0.0)
    assert reward(True, cfg) == 1.0 and reward(False, cfg) == 0.0


@pytest.mark.parametrize("kw,says", [
    ({"correct": -6.0}, r"^wrong: expected a number below correct \(-6\.0\), got -5\.0"),
    ({"wrong": float("nan")}, r"^wrong: expected a number \(finite\), got nan"),
    ({"correct": "5"}, r"^correct: expected a number \(finite\), got '5'")])
def test_reward_config_rejects_bad_values_naming_the_field(kw, says):
    with pytest.raises(ValueError, match=says):
        RewardConfig(**kw)
