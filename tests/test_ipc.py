"""`fastgen.ipc`: the codec, the seal that authenticates frames, private socket directories."""

from __future__ import annotations

import os
import stat

import msgspec
import pytest

from fastgen.errors import AccessDeniedError
from fastgen.ipc import Codec, Seal, private_dir, unsealed_body


class Ping(msgspec.Struct, tag="ping"):
    request_id: str


class Pong(msgspec.Struct, tag="pong"):
    request_id: str
    body: list[int]


def test_codec_round_trips_a_tagged_union_and_refuses_garbage():
    codec: Codec[Ping | Pong] = Codec(Ping | Pong)
    for message in (Ping("a"), Pong("b", [1, 2])):
        assert codec.decode(codec.encode(message)) == message
    with pytest.raises(msgspec.ValidationError):
        codec.decode(msgspec.msgpack.encode({"type": "other"}))


def test_a_seal_opens_only_with_the_same_key_and_an_untouched_frame():
    seal, other = Seal.new(), Seal.new()
    body = Codec(Ping).encode(Ping("r1"))
    frame = seal.seal(body)
    assert seal.open(frame) == body
    assert Seal.from_hex(seal.hex()).open(frame) == body
    assert unsealed_body(frame) == body  # for naming the request a refusal answers
    tampered = frame[:-1] + bytes([frame[-1] ^ 1])
    for bad in (other.seal(body), tampered, body, frame[:10], b""):
        with pytest.raises(AccessDeniedError):
            seal.open(bad)
    with pytest.raises(ValueError):
        Seal(b"short")


def test_private_dirs_are_for_this_user_alone():
    path = private_dir()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert len(f"ipc://{path}/replies") < 100  # ipc paths are limited to ~107 bytes
    finally:
        os.rmdir(path)
