"""Penalties and logit biases: per-request changes to the logits before sampling.

- ``repetition_penalty`` (HF / vLLM): for every token of the prompt or the output so far, a positive
  logit is divided by the penalty and a negative one multiplied by it.
- ``frequency_penalty``, ``presence_penalty`` (OpenAI): ``logit -= frequency * count + presence *
  (count > 0)``, where ``count`` is how often the token occurs in the output so far.
- ``logit_bias``: token id -> a value added to the logit, after the penalties.

The runner of every rank keeps a `PenaltyTable`: one slot per sequence that asks, holding on the
device the sequence's output counts and which tokens it has seen (prompt or output), and a
`PenaltyTracker` per such sequence on the host. The token ids arrive in the plans' chunks: the
prompt (and, when a preempted sequence is recomputed, its earlier output), then each decode's
token, the one sampled the step before. At the sequence's first sample its prompt length is known
(tokens seen minus tokens generated before the sequence started on this worker). Each step sends
one float32 vector to the device (token ids and counts are exact in float32: below 2**24) holding
the rows' options and what changed since the last step (usually one token per row, the whole prompt
at a first sample); the counts stay on the device.
"""

from __future__ import annotations

import array
from collections.abc import Iterable

import torch

from fastgen.plan import SamplingOptions, SequenceChunk


class PenaltyTracker:
    """One sequence's options and the token ids its slot of the table has not taken in yet."""

    def __init__(self, options: SamplingOptions, slot: int):
        self.presence = options.presence_penalty
        self.frequency = options.frequency_penalty
        self.repetition = options.repetition_penalty
        self.logit_bias = options.logit_bias
        self.slot = slot
        self.num_tokens = 0  # tokens the chunks brought so far
        self._before_first_sample: list[int] | None = []  # until the prompt length is known
        self.new_output: list[int] = []  # output tokens not yet counted on the device
        self.bias_ids: torch.Tensor | None = None  # on the device, from the first sample on
        self.bias_values: torch.Tensor | None = None

    def observe(self, chunk: SequenceChunk) -> None:
        """Take the token ids of one of the sequence's chunks (in position order)."""
        if chunk.start_position != self.num_tokens:
            raise RuntimeError(
                f"sequence {chunk.seq_id}: a chunk starts at position {chunk.start_position}, but "
                f"{self.num_tokens} tokens came before it (penalties need every token id)"
            )
        self.num_tokens += len(chunk.token_ids)
        if self._before_first_sample is not None:
            self._before_first_sample.extend(chunk.token_ids)
        else:
            self.new_output.extend(chunk.token_ids)

    @property
    def started(self) -> bool:
        """The first sample has split the tokens seen into prompt and output."""
        return self._before_first_sample is None

    def start(self, num_generated: int) -> list[int]:
        """At the first sample, with ``num_generated`` tokens of output among those seen: queue the
        output, and return the prompt's distinct ids (none unless the repetition penalty needs them)."""
        tokens = self._before_first_sample
        assert tokens is not None
        self._before_first_sample = None
        prompt_len = len(tokens) - num_generated
        self.new_output = tokens[prompt_len:]
        return list(set(tokens[:prompt_len])) if self.repetition != 1.0 else []


class PenaltyTable:
    """The slots of up to ``max_sequences`` sequences (more make it grow), allocated on ``device``
    at the first step that needs them: ``counts`` (float32 ``[slots, vocab]``, occurrences in the
    output) and ``seen`` (bool, in the prompt or the output)."""

    def __init__(self, max_sequences: int, device: torch.device):
        self.device = device
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None
        self.num_slots = max_sequences
        self._free = list(range(max_sequences - 1, -1, -1))
        self.num_tracked = 0

    def track(self, options: SamplingOptions) -> PenaltyTracker:
        if not self._free:
            self._grow()
        self.num_tracked += 1
        return PenaltyTracker(options, self._free.pop())  # the slot is cleared at the first sample

    def release(self, tracker: PenaltyTracker) -> None:
        self.num_tracked -= 1
        self._free.append(tracker.slot)

    def _grow(self) -> None:
        added = max(1, self.num_slots)
        self._free = list(range(self.num_slots + added - 1, self.num_slots - 1, -1))
        self.num_slots += added
        if self.counts is not None:
            self.counts = torch.cat([self.counts, self.counts.new_zeros(added, self.counts.shape[1])])
            self.seen = torch.cat([self.seen, self.seen.new_zeros(added, self.seen.shape[1])])

    def apply(
        self, logits: torch.Tensor, rows: list[int], trackers: list[PenaltyTracker], num_generated: list[int]
    ) -> torch.Tensor:
        """``logits`` ``[batch, vocab]`` in float32 (a copy unless already float32) with each of
        ``rows`` changed by its sequence's penalties and biases (``trackers[i]`` is row ``rows[i]``'s
        sequence, which has generated ``num_generated[i]`` tokens so far)."""
        if self.counts is None:
            self.counts = torch.zeros(self.num_slots, logits.shape[-1], device=self.device)
            self.seen = torch.zeros(self.num_slots, logits.shape[-1], dtype=torch.bool, device=self.device)
        packer = _pack(rows, trackers, num_generated)
        packer.upload(self.device)
        self._take_in(packer)
        table = packer["header"].view(len(rows), 5)  # row, slot, presence, frequency, repetition
        row_index, slots = table[:, 0].long(), table[:, 1].long()
        selected = logits[row_index].float()
        if any(tracker.repetition != 1.0 for tracker in trackers):
            seen, repetition = self.seen[slots], table[:, 4:5]
            # HF's rule, divisions and products as it computes them (a division by 1 changes nothing)
            selected.div_(torch.where(seen & (selected > 0), repetition, 1.0))
            selected.mul_(torch.where(seen & (selected < 0), repetition, 1.0))
        if any(tracker.presence or tracker.frequency for tracker in trackers):
            counts = self.counts[slots]
            selected.sub_(table[:, 3:4] * counts)
            selected.sub_(table[:, 2:3] * counts.clamp_(max=1.0))  # counts are whole numbers
        bias_rows = [i for i, tracker in enumerate(trackers) if tracker.logit_bias]
        if bias_rows:
            ids = torch.cat([trackers[i].bias_ids for i in bias_rows])
            values = torch.cat([trackers[i].bias_values for i in bias_rows])
            selected[_rows_of(packer, "bias", len(ids)), ids] += values
        adjusted = logits.float()
        adjusted[row_index] = selected
        return adjusted

    def _take_in(self, packer: _Packer) -> None:
        """Clear the slots of the sequences first sampled this step, record their prompts, count the
        new output, and keep the new sequences' biases on the device."""
        counts, seen = self.counts, self.seen
        if packer.size("fresh_slots"):
            fresh = packer["fresh_slots"].long()
            counts[fresh] = 0.0
            seen[fresh] = False
        if packer.size("prompt_ids"):
            seen[_rows_of(packer, "prompt", packer.size("prompt_ids")), packer["prompt_ids"].long()] = True
        if packer.size("output_ids"):
            slots = _rows_of(packer, "output", packer.size("output_ids"))
            ids = packer["output_ids"].long()
            counts.index_put_((slots, ids), torch.ones_like(ids, dtype=counts.dtype), accumulate=True)
            seen[slots, ids] = True
        if packer.fresh_bias:
            bias_ids, bias_values = packer["fresh_bias_ids"].long(), packer["fresh_bias_values"].clone()
            at = 0
            for tracker in packer.fresh_bias:
                end = at + len(tracker.logit_bias)
                tracker.bias_ids, tracker.bias_values = bias_ids[at:end], bias_values[at:end]
                at = end


def _pack(rows: list[int], trackers: list[PenaltyTracker], num_generated: list[int]) -> _Packer:
    """The step's vector: per row (row, slot, presence, frequency, repetition); the slots first
    sampled now, with their prompts' distinct ids and their biases; the output tokens to count."""
    header: list[float] = []
    fresh_slots: list[int] = []
    prompt_slots, prompt_lengths, prompt_ids = [], [], []
    output_slots, output_lengths, output_ids = [], [], []
    fresh_bias: list[PenaltyTracker] = []
    for row, tracker, generated in zip(rows, trackers, num_generated):
        slot = tracker.slot
        if not tracker.started:
            fresh_slots.append(slot)
            ids = tracker.start(generated)
            if ids:
                prompt_slots.append(slot)
                prompt_lengths.append(len(ids))
                prompt_ids += ids
            if tracker.logit_bias:
                fresh_bias.append(tracker)
        if tracker.new_output:
            output_slots.append(slot)
            output_lengths.append(len(tracker.new_output))
            output_ids += tracker.new_output
            tracker.new_output = []
        header += (row, slot, tracker.presence, tracker.frequency, tracker.repetition)
    bias_rows = [i for i, tracker in enumerate(trackers) if tracker.logit_bias]
    packer = _Packer(fresh_bias)
    packer.add("header", header)
    packer.add("fresh_slots", fresh_slots)
    for kind, slots, lengths, ids in (
        ("prompt", prompt_slots, prompt_lengths, prompt_ids),
        ("output", output_slots, output_lengths, output_ids),
    ):
        packer.add(f"{kind}_rows", slots)
        packer.add(f"{kind}_lengths", lengths)
        packer.add(f"{kind}_ids", ids)
    packer.add("fresh_bias_ids", (token for tracker in fresh_bias for token in tracker.logit_bias))
    packer.add("fresh_bias_values", (bias for tracker in fresh_bias for bias in tracker.logit_bias.values()))
    packer.add("bias_rows", bias_rows)
    packer.add("bias_lengths", [len(trackers[i].logit_bias) for i in bias_rows])
    return packer


class _Packer:
    """Named sections of one float32 vector, built on the host and copied to the device at once."""

    def __init__(self, fresh_bias: list[PenaltyTracker]) -> None:
        self.values = array.array("f")  # converts Python numbers faster than torch.tensor does
        self.sections: dict[str, tuple[int, int]] = {}
        self.device_values: torch.Tensor | None = None
        self.fresh_bias = fresh_bias

    def add(self, name: str, values: Iterable[float]) -> None:
        start = len(self.values)
        self.values.extend(values)
        self.sections[name] = (start, len(self.values) - start)

    def size(self, name: str) -> int:
        return self.sections[name][1]

    def upload(self, device: torch.device) -> None:
        host = torch.frombuffer(self.values, dtype=torch.float32)
        self.device_values = host.to(device, non_blocking=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        start, length = self.sections[name]
        return self.device_values[start : start + length]


def _rows_of(packer: _Packer, kind: str, total: int) -> torch.Tensor:
    """For each of the ``total`` ids of ``kind`` (in the order of their concatenation), the index of
    its row: its slot for "prompt" and "output", its index in ``rows`` for "bias"."""
    rows = packer[f"{kind}_rows"].long()
    return torch.repeat_interleave(rows, packer[f"{kind}_lengths"].long(), output_size=total)


def worst_case_trackers(table: PenaltyTable, rows: int) -> list[PenaltyTracker]:
    """Trackers of ``rows`` sequences in ``table`` that use every penalty and a bias, with a token
    of output (``num_generated`` 1): for measuring the memory a step of `PenaltyTable.apply` takes."""
    options = SamplingOptions(1.0, 0, 1.0, None, 0, [], None, 0.5, 0.5, 1.1, {0: 1.0})
    trackers = []
    for row in range(rows):
        tracker = table.track(options)
        tracker.observe(SequenceChunk(row, [1, 2], 0, [], True))
        trackers.append(tracker)
    return trackers
