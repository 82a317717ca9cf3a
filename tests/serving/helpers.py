"""Helpers of the serving tests: raw HTTP over a socket, Prometheus text parsing, polling."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit


def raw_post(url: str, path: str, body: bytes, timeout_s: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """POST like curl does, over a plain socket: (status, headers, body with chunking removed)."""
    parts = urlsplit(url)
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout_s) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    if headers.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return int(status_line.split()[1]), headers, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def sse_events(body: bytes) -> list:
    """The JSON payloads of an SSE body, checking its framing byte by byte: only
    ``data: <json>\\n\\n`` events, ending with exactly one ``data: [DONE]\\n\\n``."""
    assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
    frames = body[: -len(b"data: [DONE]\n\n")].split(b"\n\n")
    assert frames[-1] == b"", "every event ends with a blank line"
    events = []
    for frame in frames[:-1]:
        assert frame.startswith(b"data: ") and b"\n" not in frame, frame
        events.append(json.loads(frame[len(b"data: ") :]))
    return events


def metric(text: str, name: str, labels: str = "", *, unset: float | None = None) -> float:
    """One sample of a Prometheus text exposition. A missing sample raises (a renamed or dropped
    metric must not read as 0), except that with ``unset`` a labelled sample not created yet reads
    as ``unset`` while its family is declared (a counter's label values appear once counted)."""
    sample = name + (f"{{{labels}}}" if labels else "")
    match = re.search(re.escape(sample) + r" ([0-9.e+-]+)$", text, re.MULTILINE)
    if match:
        return float(match.group(1))
    declared = re.search(rf"^# TYPE {re.escape(name)} ", text, re.MULTILINE)
    if unset is not None and labels and declared:
        return unset
    raise AssertionError(f"no sample {sample} in the metrics:\n{text}")


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float) -> Any:
    """Poll ``condition()`` until it returns something true, and return that (the bound is slack)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout_s:g} s")
