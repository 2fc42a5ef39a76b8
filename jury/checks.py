"""Checks a reader makes on an answer's text without a model: is the arithmetic it shows right?

An answer that works a problem out ("12 * 3 = 36, so 36 + 4 = 40") states calculations a
reader can redo, and an answer to "Solve 2x + 3 = 11." that says "x = 7" can be put back into
the equation. A 135M-parameter juror cannot do either: its likelihoods barely move when a stated
result is off, and the truthfulness probe reads the answer's meaning, not its sums. Redoing them
is exact and cheap, and a calculation stated wrong is strong evidence against the answer (on
crosscheck_dev's GSM8K model solutions, 34 of 788 wrong answers state one, and 3 of 606 correct
ones).

Only what can be read without guessing counts: numbers joined by ``+ - * / x × ÷`` right before
``=`` and a number, with ``$``, ``%`` and thousands separators allowed, and results rounded to the
digits they show. A calculation that begins after an operator or a word that may belong to it
("12 kg * 1/3 = 4") is skipped: its left side is not all on the page. An equation is read from
the question only when it has one unknown, and checked only when the answer states its value.
"""

from __future__ import annotations

import ast
import operator
import re

_NUMBER = r"\$?\d{1,3}(?: \d{3})+(?!\d|\.\d)|\$?\d[\d,]*(?:\.\d+)?%?"
_OPERATOR = r"[ \t]*[-+*/×÷][ \t]*|[ \t]+x[ \t]+"
_RESULT = r"-?\$?\d{1,3}(?: \d{3})+(?!\d|\.\d)|-?\$?\d+(?:,\d{3})*(?:\.\d+)?"
_CALCULATION = re.compile(
    r"(?<![\w.\-/$,*+×÷^])(?<![-+*/×÷] )"  # not the tail of a longer expression or a number
    rf"(-?(?:{_NUMBER})(?:(?:{_OPERATOR})(?:{_NUMBER}))+)"
    rf"[ \t]*=[ \t]*({_RESULT})(?![\d%/*×÷]|[ \t]*[-+*/×÷][ \t]*\d)"  # the result is not itself the start of an expression
)
_SPLIT = re.compile(rf"({_OPERATOR})")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOLS = {"x": "*", "×": "*", "÷": "/"}


def _number(token: str) -> float:
    token = token.replace("$", "").replace(",", "").replace(" ", "")
    return float(token[:-1]) / 100 if token.endswith("%") else float(token)


def _evaluate(node: ast.AST, names: dict[str, float] | None = None) -> float:
    """The value of an expression of numbers, ``names`` and + - * / (and powers up to 4) only;
    anything else raises ValueError."""
    names = names or {}
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, names)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return float(node.value)
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, names)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left, names), _evaluate(node.right, names))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        exponent = node.right
        if isinstance(exponent, ast.Constant) and isinstance(exponent.value, int) and 0 <= exponent.value <= 4:
            return _evaluate(node.left, names) ** exponent.value
    raise ValueError("not plain arithmetic")


def _left_side_value(text: str) -> float:
    negative = text.startswith("-")
    parts = _SPLIT.split(text[1:] if negative else text)
    expression = "".join(
        _SYMBOLS.get(part.strip(), part.strip()) if i % 2 else repr(_number(part)) for i, part in enumerate(parts)
    )
    return _evaluate(ast.parse(("-" if negative else "") + expression, mode="eval"))


def _agrees(value: float, stated: str) -> bool:
    """Does ``stated`` write ``value``, to the digits it shows? A share may be written as a
    percentage, and a difference without its sign ("2020-2021 = 1 year")."""
    digits = stated.replace("$", "").replace(",", "").replace(" ", "")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    result = float(digits)
    tolerance = 0.5 * 10.0**-decimals + 1e-9
    return any(abs(v - result) <= max(tolerance, 0.005 * abs(result)) for v in (value, abs(value), 100 * value))


def calculations(text: str) -> list[tuple[str, str, bool]]:
    """Every calculation ``text`` states that can be redone: (left side, stated result, right?)."""
    found = []
    for match in _CALCULATION.finditer(text):
        try:
            value = _left_side_value(match.group(1))
        except (ValueError, ZeroDivisionError, SyntaxError, OverflowError):
            continue
        found.append((match.group(1), match.group(2), _agrees(value, match.group(2))))
    return found


def arithmetic_slips(text: str) -> int:
    """How many of the calculations ``text`` states have a wrong result."""
    return sum(not right for _, _, right in calculations(text))


_TOKEN = re.compile(r"\d+(?:\.\d+)?|[A-Za-z]+|[-+*/^()]|\S")
_ALGEBRA = re.compile(r"\d+(?:\.\d+)?|[A-Za-z]|[-+*/^()]")


def _algebra(tokens: list[str]) -> list[str]:
    """The longest run of ``tokens`` that is algebra (numbers, one-letter names, operators), from its start."""
    run = []
    for token in tokens:
        if not _ALGEBRA.fullmatch(token):
            break
        run.append(token)
    return run


def _expression(tokens: list[str]) -> str:
    """Python for ``tokens``, with the multiplication that "2x" and "3(x + 1)" leave out written in."""
    out: list[str] = []
    for token in tokens:
        operand_start = token[0].isalnum() or token == "("
        if out and operand_start and (out[-1][-1].isalnum() or out[-1] == ")"):
            out.append("*")
        out.append("**" if token == "^" else token)
    return " ".join(out)


def _evaluate_with(expression: str, name: str, value: float) -> float:
    return _evaluate(ast.parse(expression, mode="eval"), {name: value})


def equation_in(question: str) -> tuple[str, str, str] | None:
    """(left side, right side, unknown) of the one-unknown equation ``question`` asks to solve
    ("Solve 2x + 3 = 11."), as Python; None when it states none."""
    if question.count("=") != 1:
        return None
    before, after = question.split("=")
    left = _algebra(list(reversed(_TOKEN.findall(before))))[::-1]
    right = _algebra(_TOKEN.findall(after))
    while right and right[-1] in "+-*/^(":
        right.pop()
    names = {t for t in left + right if t.isalpha()}
    if len(names) != 1 or not left or not right:
        return None
    return _expression(left), _expression(right), names.pop()


def unsolved_equation(question: str, answer: str) -> bool:
    """True when ``answer`` gives the unknown of the equation in ``question`` a value ("x = 7")
    that does not satisfy it."""
    equation = equation_in(question)
    if equation is None:
        return False
    left, right, name = equation
    stated = re.search(rf"(?<![A-Za-z]){name}\s*(?:=|is|equals)\s*(-?\d+(?:\.\d+)?)(?![\d/])", answer)
    if stated is None:
        return False
    value = float(stated.group(1))
    try:
        sides = _evaluate_with(left, name, value), _evaluate_with(right, name, value)
    except (ValueError, ZeroDivisionError, SyntaxError, OverflowError, RecursionError):
        return False
    return abs(sides[0] - sides[1]) > 1e-6 * max(1.0, abs(sides[0]), abs(sides[1])) + 0.01


def text_checks(question: str, answer: str) -> dict[str, float]:
    """Each check's outcome on ``answer`` to ``question``: 1.0 when it fails (the calibrator's
    ``CHECK_FEATURES``). ``arithmetic_slip``: a calculation the answer states has a wrong result,
    or the value it gives the unknown of the question's equation does not solve it."""
    slipped = arithmetic_slips(answer) > 0 or unsolved_equation(question, answer)
    return {"arithmetic_slip": float(slipped)}
