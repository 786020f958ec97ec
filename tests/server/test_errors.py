"""``server/errors.py``: the one way from an exception to an answer.

The error-id and redaction rules for failures are specified end to end in
tests/scenarios/test_fault_paths.py; these state how the table is found and
what each kind of answer carries.
"""

from __future__ import annotations

import orjson
import pytest

from batching import (
    BatchFailed,
    Cancelled,
    Closed,
    DeadlineExceeded,
    Hung,
    ModelFailed,
    NotRun,
    OutOfResources,
    Overloaded,
    Refused,
)
from server.errors import (
    ANSWERS,
    BadRequest,
    HeadersTooLarge,
    MethodNotAllowed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    RequestTimeout,
    ServerError,
    Unauthorized,
    answer,
)


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (BadRequest("x"), 400, "invalid"),
        (Unauthorized("x"), 401, "unauthorized"),
        (NotFound("x"), 404, "not_found"),
        (MethodNotAllowed("x"), 405, "method_not_allowed"),
        (RequestTimeout("x"), 408, "timeout"),
        (PayloadTooLarge("x"), 413, "too_large"),
        (HeadersTooLarge("x"), 431, "too_large"),
        (NotReady("x"), 503, "not_ready"),
        (Overloaded("x", 3.7), 503, "overloaded"),
        (Closed("x"), 503, "shutting_down"),
        (Cancelled("x"), 503, "shutting_down"),
        (DeadlineExceeded("x"), 504, "deadline_exceeded"),
        (Hung("x"), 504, "model_hung"),
    ],
)
def test_each_error_is_answered_with_its_status_reason_and_own_message(
    error: Exception, status: int, reason: str
) -> None:
    told = answer(error)
    assert (told.status, told.reason, told.message) == (status, reason, "x")
    assert orjson.loads(told.body) == {"error": "x", "reason": reason}  # no error id: no failure


def test_a_subclass_is_answered_as_its_nearest_ancestor_in_the_table() -> None:
    class Saturated(Overloaded):
        pass

    class Stale(DeadlineExceeded):
        pass

    assert Saturated not in ANSWERS
    assert Stale not in ANSWERS
    assert (answer(Saturated("x", 2.0)).status, answer(Saturated("x", 2.0)).reason) == (
        503,
        "overloaded",
    )
    assert answer(Stale("x")).reason == "deadline_exceeded"


def test_every_batching_category_is_answered_and_none_falls_through_to_internal() -> None:
    leaves = [Overloaded("x", 1.0), Closed("x"), DeadlineExceeded("x"), Cancelled("x")]
    leaves += [BatchFailed("x"), OutOfResources("x"), Hung("x")]
    for error in leaves:
        assert isinstance(error, Refused | NotRun | ModelFailed)
        assert answer(error).reason != "internal", error


def test_a_refusal_says_when_to_retry_in_a_header_and_in_a_stream_frame() -> None:
    full = answer(Overloaded("full", 3.7))
    assert full.headers == [(b"retry-after", b"3")]
    assert orjson.loads(full.frame("r1")) == {
        "id": "r1",
        "error": "full",
        "status": 503,
        "reason": "overloaded",
        "retry_after": 3,
    }
    assert answer(Closed("draining")).headers == [(b"retry-after", b"1")]
    assert "retry_after" not in orjson.loads(answer(DeadlineExceeded("late")).frame(None))


def test_a_server_error_carries_its_own_headers_into_the_answer() -> None:
    challenge = (b"www-authenticate", b'Bearer realm="carpool"')
    told = answer(Unauthorized("who are you?", [challenge]))
    assert told.headers == [challenge]
    assert answer(BadRequest("x")).headers == []


def test_a_model_failure_traced_to_its_item_is_422_and_to_its_batch_500() -> None:
    assert answer(BatchFailed("poison", item_error=True)).status == 422
    assert answer(BatchFailed("wrong length")).status == 500


def test_anything_unknown_even_a_base_exception_is_our_500_with_no_detail() -> None:
    for error in (KeyError("/srv/secret"), KeyboardInterrupt(), ServerError("bug")):
        told = answer(error)
        assert (told.status, told.reason) == (500, "internal")
    told = answer(KeyboardInterrupt("/srv/secret"))
    assert "/srv" not in told.message
    assert told.error_id is not None
    assert told.error_id in told.message
