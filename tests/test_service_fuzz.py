"""A bounded schemathesis run over the service's own OpenAPI schema: no request may get a 5xx answer.

A real engine on loopback (its own, with an empty root folder and a roomy queue so that ``503 busy`` is not
what the fuzzer finds); every operation gets a few generated requests that fit the schema and a few that
do not, all with the token. Bounded to stay well under a minute.

The cases come from schemathesis's Hypothesis strategies (``operation.as_strategy``), driven by a plain
``@given``: schemathesis 4.32's lazy pytest loader (``from_fixture``) reads a pytest-internal attribute
that pytest 9 no longer has.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402

from engine.client import launch  # noqa: E402

SERVE = [sys.executable, "-m", "engine.cli", "serve"]
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10}  # per operation


@pytest.fixture(scope="module")
def fuzz_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_root")
    log = tmp_path_factory.mktemp("fuzz_log") / "engine.log"
    with log.open("wb") as stderr:
        eng = launch(
            SERVE, roots=[str(root)], extra_args=["--queue", "256", "--max-upload-mb", "1"], stderr=stderr
        )
        try:
            yield eng
        finally:
            assert eng.stop() == 0
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    # whatever the fuzzer asked for, the jobs left no litter
    assert not [p for p in root.rglob("*") if p.name.endswith((".partial", ".parts"))]


def _fuzz(operation, mode, n: int, auth: dict, calls: dict, failures: list) -> None:
    """``n`` generated requests for one operation; 5xx answers, tracebacks and non-JSON errors recorded."""

    @settings(max_examples=n, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(headers=auth, timeout=60)
        calls[operation.label] = calls.get(operation.label, 0) + 1
        text = response.text
        where = f"{case.method} {case.formatted_path} {case.body!r:.300}"
        if response.status_code >= 500 or "Traceback" in text:
            failures.append(f"{where}: {response.status_code} {text:.300}")
        elif response.status_code >= 400 and set(response.json()) != {"code", "message"}:
            failures.append(f"{where}: error body {text:.300}")

    check()


def test_fuzz_the_openapi_schema_finds_no_server_error(fuzz_engine):
    auth = {"Authorization": "Bearer " + Path(fuzz_engine.token_file).read_text().strip()}
    schema = schemathesis.openapi.from_url(fuzz_engine.url + "/openapi.json", headers=auth, timeout=30)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert len(operations) >= 12
    calls: dict[str, int] = {}
    failures: list[str] = []
    for operation in operations:
        for mode, n in EXAMPLES.items():
            _fuzz(operation, mode, n, auth, calls, failures)
    assert not failures, "\n".join(failures[:10])
    assert sum(calls.values()) >= 5 * len(operations), calls
    assert fuzz_engine.client.health()["status"] == "ok"
