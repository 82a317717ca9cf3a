"""The body of MII's REST route, ``POST /mii/{deployment_name}``.

MII's gateway passes the JSON body to ``client.generate(**body)``: ``prompts`` (a string or a
list) plus generation options with MII's names. fastgen also accepts ``prompt`` for one prompt.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from fastgen.errors import InvalidRequestError
from fastgen.mii import mii_response, parse_mii_options
from fastgen.outputs import RequestOutput
from fastgen.sampling_params import SamplingParams
from fastgen.streams import CollectedOutput


class MiiRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompts: str | list[str] | UnsetType = UNSET
    prompt: str | UnsetType = UNSET
    max_length: int | UnsetType | None = UNSET
    max_new_tokens: int | UnsetType | None = UNSET
    min_new_tokens: int | UnsetType = UNSET
    ignore_eos: bool | UnsetType = UNSET
    return_full_text: bool | UnsetType = UNSET
    do_sample: bool | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    top_k: int | UnsetType | None = UNSET
    temperature: float | UnsetType | None = UNSET
    stop: str | list[str] | UnsetType = UNSET
    seed: int | UnsetType | None = UNSET
    stream: bool | UnsetType = UNSET

    @property
    def streaming(self) -> bool:
        return self.stream is True

    def prompt_list(self) -> list[str]:
        """The prompts, validated: at least one, none empty."""
        if self.prompts is not UNSET and self.prompt is not UNSET:
            raise InvalidRequestError("prompt", "give either `prompts` or `prompt`, not both")
        prompts: Any = self.prompts if self.prompts is not UNSET else self.prompt
        if prompts is UNSET:
            raise InvalidRequestError("prompts", "missing: give `prompts` (a list of strings) or `prompt`")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise InvalidRequestError("prompts", "the list of prompts is empty")
        for prompt in prompts:
            if not prompt:
                raise InvalidRequestError("prompts", "a prompt is empty")
        return list(prompts)

    def sampling(self) -> tuple[SamplingParams, bool]:
        """(`SamplingParams`, ``return_full_text``) from the options given, with MII's defaults."""
        options = {
            name: value
            for name, value in msgspec.structs.asdict(self).items()
            if value is not UNSET and name not in ("prompts", "prompt")
        }
        return parse_mii_options(options)


def response_dict(
    prompt: str, text: str, output: RequestOutput | CollectedOutput, *, full_text: bool, first: bool = True
) -> dict:
    """One prompt's result (or stream delta) as MII serialises a `Response` (see `mii_response`)."""
    return msgspec.structs.asdict(mii_response(prompt, text, output, full_text=full_text, first=first))
