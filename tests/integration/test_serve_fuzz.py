"""Fuzz the HTTP API from its own OpenAPI schema against the real server (schemathesis + hypothesis).

Every operation gets its share of generated requests, half that fit the schema and half that do
not. Every answer must be below 500 and match the schema: a documented status, its content type,
its body shape (errors included: they are documented per route). CI runs a short derandomized
run; ``MOSE_FUZZ_EXAMPLES=1000`` (or more) runs the full one with the same code. Generation asks
for at most ``TINY_TOKENS`` tokens so the 2-core CPU answers quickly; everything else is as
generated.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import schemathesis

EXAMPLES_ENV = "MOSE_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 150
TINY_TOKENS = 2
PROTECTED_EXPERTS = {"med-expert", "math-expert", "fin-expert"}
"""Experts the other tests rely on: never retired by a generated admin call."""


@dataclass
class FuzzReport:
    """What the run sent and got back."""

    statuses: Counter = field(default_factory=Counter)
    per_operation: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    unsatisfiable: list[str] = field(default_factory=list)
    """(operation, mode) pairs for which no data of that mode exists (e.g. an invalid string path parameter)."""

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    def server_errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status >= 500)


def tame(case: Any) -> None:
    """Keep generation cheap and other tests' experts alive; leave everything else as generated."""
    body = case.body
    if case.path in ("/v1/chat/completions", "/v1/completions") and isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value:
                body[key] = min(value, TINY_TOKENS) if value <= 256 else value  # above 256: a 400 anyway
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = TINY_TOKENS
    if case.path == "/v1/crosscheck" and isinstance(body, dict) and body.get("own_answers") is True:
        body["own_answers"] = False  # jurors writing 48-token answers each: covered in test_serve_http
    name = (case.path_parameters or {}).get("name")
    if name in PROTECTED_EXPERTS:
        case.path_parameters["name"] = f"fuzz-{name}"


def fuzz_operation(operation: Any, mode: Any, examples: int, served: Any, report: FuzzReport) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case):
        tame(case)
        response = case.call(base_url=served.url, headers=served.admin(), timeout=120)
        report.statuses[response.status_code] += 1
        report.per_operation[f"{operation.method.upper()} {operation.path}"] += 1
        try:
            case.validate_response(response, checks=checks)
        except (Exception, BaseExceptionGroup) as exc:  # collected, so one run reports every failure
            report.failures.append(
                f"{case.method} {case.path} {mode} -> {response.status_code}: {str(exc)[:600]}\n"
                f"  body sent: {json.dumps(case.body, default=repr)[:4000]}"
            )

    try:
        one()
    except Unsatisfiable:
        report.unsatisfiable.append(f"{operation.method.upper()} {operation.path} {mode}")


def fuzz_plan(operations: list[Any], total: int) -> list[tuple[Any, Any, int]]:
    """(operation, mode, examples): ``total`` shared by the runs that can vary. Negative data only
    for request bodies (a string path parameter has no invalid value once in a URL); an operation
    without inputs has one possible request, sent once."""
    from schemathesis import GenerationMode

    varying, fixed = [], []
    for op in operations:
        raw = op.definition.raw
        if raw.get("requestBody"):
            varying += [(op, GenerationMode.POSITIVE), (op, GenerationMode.NEGATIVE)]
        elif raw.get("parameters"):
            varying.append((op, GenerationMode.POSITIVE))
        else:
            fixed.append((op, GenerationMode.POSITIVE, 1))
    share = math.ceil((total - len(fixed)) / len(varying))
    return fixed + [(op, mode, share) for op, mode in varying]


def test_every_generated_request_gets_a_documented_answer_and_no_5xx(served):
    total = int(os.environ.get(EXAMPLES_ENV, DEFAULT_EXAMPLES))
    raw = httpx.get(f"{served.url}/openapi.json", timeout=30).json()
    operations = [result.ok() for result in schemathesis.openapi.from_dict(raw).get_all_operations()]
    report = FuzzReport()
    started = time.perf_counter()
    for operation, mode, examples in fuzz_plan(operations, total):
        fuzz_operation(operation, mode, examples, served, report)
    seconds = time.perf_counter() - started
    print(
        f"\nfuzz: {report.requests} requests in {seconds:.0f} s; statuses {dict(sorted(report.statuses.items()))}; "
        f"5xx: {report.server_errors()}; per operation {dict(report.per_operation)}; "
        f"no data of that kind: {report.unsatisfiable}"
    )
    assert report.server_errors() == 0 and not report.failures, "\n".join(report.failures[:20])
    assert report.requests >= total and not report.unsatisfiable
    assert len(report.per_operation) == len(operations)
