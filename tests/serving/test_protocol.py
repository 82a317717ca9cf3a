"""The wire protocol and the one table mapping error types to HTTP statuses (no processes)."""

from __future__ import annotations

import msgspec
import pytest

from fastgen import SamplingParams
from fastgen.errors import (
    DeploymentNotFoundError,
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    StepError,
)
from fastgen.inputs import ChatMessage, ChatPrompt
from fastgen.outputs import RequestOutput
from fastgen.serving.errors import ModelNotFoundError, describe_error
from fastgen.serving.protocol import (
    Cancel,
    Control,
    Generate,
    Output,
    Reply,
    decode,
    encode,
    error_from_message,
    error_message,
)


@pytest.mark.parametrize("prompt", ["text", [1, 2, 3], ChatPrompt([ChatMessage("user", "hi")])])
def test_messages_round_trip(prompt):
    params = SamplingParams(max_new_tokens=3, stop=["x"], seed=7)
    for message in (
        Generate("r1", prompt, params),
        Cancel("r1"),
        Control("r2", "stats"),
        Reply("r2", {"a": 1}),
        Output(RequestOutput(request_id="r1", text="a", token_ids=[5], prompt_tokens=2, generated_tokens=1)),
    ):
        assert decode(encode(message)) == message


@pytest.mark.parametrize(
    "error",
    [
        InvalidRequestError("top_p", "must be in (0, 1]"),
        EngineOverloadedError("full"),
        EngineDeadError("gone"),
        StepError("boom"),
        DeploymentNotFoundError("nope"),
    ],
)
def test_errors_cross_the_wire_with_their_type(error):
    rebuilt = error_from_message(decode(encode(error_message("r", error))))
    assert type(rebuilt) is type(error)
    assert str(rebuilt) == str(error)
    if isinstance(error, InvalidRequestError):
        assert rebuilt.field == "top_p"


def test_unknown_errors_become_internal_errors():
    rebuilt = error_from_message(error_message("r", KeyError("x")))
    assert "internal error" in str(rebuilt)


def _validation_error(body: bytes) -> Exception:
    class Body(msgspec.Struct, forbid_unknown_fields=True):
        n: int

    with pytest.raises(msgspec.DecodeError) as info:
        msgspec.json.decode(body, type=Body)
    return info.value


@pytest.mark.parametrize(
    "error, status, param",
    [
        (_validation_error(b"{"), 400, None),
        (_validation_error(b'{"n": "x"}'), 422, "n"),
        (_validation_error(b'{"n": 1, "extra": 2}'), 422, "extra"),
        (_validation_error(b"{}"), 422, "n"),
        (InvalidRequestError("prompt", "too long"), 400, "prompt"),
        (ModelNotFoundError("m"), 404, None),
        (DeploymentNotFoundError("d"), 404, None),
        (EngineOverloadedError("full"), 503, None),
        (EngineDeadError("dead"), 503, None),
        (StepError("boom"), 500, None),
        (RuntimeError("bug"), 500, None),
    ],
)
def test_status_table(error, status, param):
    info = describe_error(error)
    assert info.status == status
    assert info.param == param
    assert set(info.body()["error"]) == {"message", "type", "param", "code"}
