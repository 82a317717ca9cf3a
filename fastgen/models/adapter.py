"""`Adapter`: what one model family owns, as data over the shared decoder.

- ``read_config``: the family's ``config.json`` -> `ModelConfig` (the decoder's layer options),
  refusing settings fastgen does not implement with an `UnsupportedModelError` that names them.
- Weight names: the family's checkpoint names -> the decoder's canonical names (Llama's:
  ``model.layers.N.self_attn.q_proj.weight``, ``model.layers.N.mlp.gate_proj.weight``, ...).
  ``renames`` are regular-expression substitutions applied in order; ``split`` cuts a fused
  checkpoint tensor (Falcon's ``query_key_value``, Qwen's ``c_attn``) into row blocks of canonical
  tensors. The loader reads each rank's rows through those blocks, so tensor parallelism shards a
  fused tensor by the same rules (heads, features) as the separate ones.
- ``ignored``: checkpoint tensors that are no weights (rotary caches, attention-mask buffers).

No torch here: the engine process reads configs through adapters without loading a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import ModelConfig

RowBlocks = list[tuple[int, int]]  # [start, stop) row ranges of a checkpoint tensor, in order
Split = Callable[[str, ModelConfig], "list[tuple[str, RowBlocks]] | None"]

_NOT_WEIGHTS = (r"\.inv_freq$", r"\.cos_cached$", r"\.sin_cached$")


@dataclass(frozen=True)
class Adapter:
    read_config: Callable[[dict[str, Any]], ModelConfig]
    renames: tuple[tuple[str, str], ...] = ()
    split: Split | None = None
    ignored: tuple[str, ...] = _NOT_WEIGHTS
    model: str = "fastgen.models.decoder:CausalLM"  # module:class built for this family

    def canonical_tensors(self, name: str, config: ModelConfig) -> list[tuple[str, RowBlocks | None]]:
        """The canonical tensors checkpoint tensor ``name`` holds: ``(name, None)`` for a whole
        tensor, ``(name, rows)`` for row blocks of a fused one; none for a tensor that is no weight."""
        if any(re.search(pattern, name) for pattern in self.ignored):
            return []
        for pattern, replacement in self.renames:
            name = re.sub(pattern, replacement, name)
        parts = self.split(name, config) if self.split is not None else None
        return [(name, None)] if parts is None else list(parts)


def head_rows(head: int, head_dim: int, offset: int = 0) -> tuple[int, int]:
    """The rows of one head's projection, ``offset`` rows into a fused tensor."""
    return offset + head * head_dim, offset + (head + 1) * head_dim
