"""What a request's iterator yields."""

from __future__ import annotations

import msgspec


class RequestOutput(msgspec.Struct, kw_only=True):
    """The new part of one request's output since the previous `RequestOutput`.

    ``text`` and ``token_ids`` are deltas; the counts are cumulative. ``finish_reason`` is
    ``None`` until the last output, then ``"stop"``, ``"length"`` or ``"abort"``.
    """

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
