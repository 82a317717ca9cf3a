"""MII's ``device_map``: which GPUs each replica of a deployment, and each tensor-parallel rank of
a replica, runs on (``fastgen.serve(..., device_map=...)``, ``fastgen.pipeline(..., device_map=...)``).

The forms DeepSpeed-MII takes (``mii/config.py``: a value that is not a dict is read as the lists
of ``localhost``), with its meaning:

- ``"auto"`` (or None): replica ``i`` on GPUs ``i*tp .. i*tp+tp-1`` of the host;
- ``g`` (an int): one replica on GPU ``g``;
- ``[g0, g1, ...]``: one replica, rank ``r`` on GPU ``g_r``;
- ``[[0, 1], [2, 3], ...]``: replica ``i`` on the ``i``-th list, rank ``r`` on its ``r``-th GPU;
- ``{host: [[...], ...]}``: the lists of each host, replicas numbered in the dict's order. Only
  this host is served for now (``localhost``, ``127.0.0.1``, ``::1`` or its own name): another
  host name is refused until deployments span hosts (Ray).

There must be one list per replica (``replica_num``), each of ``tensor_parallel`` GPUs, and no GPU
in two lists: every rank's engine takes ``gpu_memory_utilization`` of its GPU's memory, so two
sharing one would run out of it. (MII checks the counts but not the overlap.) Each list becomes
that replica's `EngineConfig.device_ids`. Torch-free: `serve` and `pipeline` check here, in the
caller's process, before anything starts.
"""

from __future__ import annotations

import json
import socket
from typing import Any

AUTO = "auto"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")

DeviceMap = int | list[int] | list[list[int]] | dict[str, list[list[int]]] | str | None


def replica_device_ids(device_map: Any, *, tensor_parallel: int, replica_num: int) -> list[list[int]] | None:
    """The GPU ids of each replica that ``device_map`` names, in replica order; None for
    ``"auto"``/None (each replica then takes the next ``tensor_parallel`` GPUs). Raises a
    ValueError that names ``device_map`` and what does not fit."""
    if device_map is None or device_map == AUTO:
        return None
    if isinstance(device_map, dict):
        lists = []
        for host, host_lists in device_map.items():
            if not isinstance(host, str) or not _is_this_host(host):
                raise ValueError(
                    f"device_map places replicas on host {host!r}: deployments across hosts are not "
                    "supported yet (they need Ray); key this host's GPUs 'localhost', or give the lists alone"
                )
            lists += _replica_lists(host_lists, f"device_map[{host!r}]")
    else:
        lists = _replica_lists(device_map, "device_map")
    if len(lists) != replica_num:
        raise ValueError(
            f"device_map names GPUs for {len(lists)} replica(s) but replica_num={replica_num}: give one "
            "list of GPU ids per replica"
        )
    owner: dict[int, int] = {}
    for index, gpus in enumerate(lists):
        where = f"device_map's replica {index} ({gpus})"
        if len(gpus) != tensor_parallel:
            raise ValueError(
                f"{where} names {len(gpus)} GPU(s) but tensor_parallel={tensor_parallel}: one per rank"
            )
        if len(set(gpus)) != len(gpus):
            raise ValueError(f"{where} names a GPU twice: each tensor-parallel rank needs its own")
        for gpu in gpus:
            if gpu in owner:
                raise ValueError(
                    f"device_map puts GPU {gpu} in replicas {owner[gpu]} and {index}: each replica's "
                    "engine takes gpu_memory_utilization of its GPUs' memory, so replicas cannot share one"
                )
            owner[gpu] = index
    return lists


def parse_device_map(text: str) -> DeviceMap:
    """``--device-map`` on the command line: ``auto``, or JSON (``0``, ``[0,1]``, ``[[0],[1]]``,
    ``{"localhost": [[0,1]]}``)."""
    if text.strip() == AUTO:
        return AUTO
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(
            f"--device-map must be 'auto' or JSON such as 0, [0,1], [[0],[1]] or "
            f'{{"localhost": [[0,1]]}}, got {text!r}'
        ) from None


def _replica_lists(value: Any, name: str) -> list[list[int]]:
    """``g``, ``[g, ...]`` (one replica) or ``[[g, ...], ...]`` as lists of GPU ids."""
    if _is_gpu_id(value):
        return [[value]]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(
            f"{name} must be 'auto', a GPU id, a list of GPU ids or a list of such lists, got {value!r}"
        )
    if all(_is_gpu_id(item) for item in value):
        return [list(value)]
    if all(isinstance(item, list | tuple) and item and all(_is_gpu_id(g) for g in item) for item in value):
        return [list(item) for item in value]
    raise ValueError(f"{name} must hold GPU ids (non-negative ints) or non-empty lists of them: {value!r}")


def _is_gpu_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_this_host(host: str) -> bool:
    # the fully qualified name needs a resolver: asked only when the short name differs
    return host in LOCAL_HOSTS or host == socket.gethostname() or host == socket.getfqdn()
