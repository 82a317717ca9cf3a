"""Prefix affinity: the keys of prompt prefixes, the owners' bookkeeping, and the router's choice
between the replica that likely holds a prefix and the least loaded one."""

from __future__ import annotations

from fastgen import EngineConfig
from fastgen.serving.affinity import MAX_OWNERS, PREFIX_LENGTHS, PrefixAffinity, prefix_keys
from fastgen.serving.router import Router


def test_keys_cover_the_prefixes_shorter_than_the_prompt():
    prompt = list(range(200))
    keys = prefix_keys(prompt)
    assert len(keys) == 3  # 32, 64, 128 (a 200-token prompt computes its last token anyway)
    other = prompt[:100] + [7] * 100
    assert prefix_keys(other)[:2] == keys[:2] and prefix_keys(other)[2] != keys[2]
    assert prefix_keys(prompt[:32]) == [] and len(prefix_keys(prompt[:33])) == 1
    assert len(prefix_keys(list(range(10_000)))) == len(PREFIX_LENGTHS)


def test_owners_of_the_longest_known_prefix_most_recent_last():
    affinity = PrefixAffinity()
    system = list(range(100))
    affinity.record(prefix_keys(system + [1] * 50), replica_id=0)
    affinity.record(prefix_keys(system + [2] * 50), replica_id=1)
    # a third prompt shares 64 tokens with both: owners of the 64-token prefix, most recent last
    assert affinity.owners(prefix_keys(system + [3] * 50)) == [0, 1]
    assert affinity.owners(prefix_keys(system + [2] * 50)) == [1]  # its 128-token prefix: only 1
    assert affinity.owners(prefix_keys([9] * 150)) == []
    assert affinity.owners(prefix_keys(system + [2] * 50), among={0}) == [0]  # a shorter prefix's
    affinity.discard(prefix_keys(system + [2] * 50), 1)  # replica 1 refused it
    assert affinity.owners(prefix_keys(system + [2] * 50)) == [0]
    affinity.record(prefix_keys(system + [2] * 50), replica_id=1)
    affinity.forget(1)
    assert affinity.owners(prefix_keys(system + [2] * 50)) == [0]  # falls back to the 64-token prefix


def test_bounded_owners_and_entries():
    affinity = PrefixAffinity(capacity=4)
    keys = prefix_keys(list(range(40)))
    for replica in range(MAX_OWNERS + 3):
        affinity.record(keys, replica)
    assert affinity.owners(keys) == list(range(3, MAX_OWNERS + 3))
    for start in range(10):
        affinity.record(prefix_keys(list(range(start * 100, start * 100 + 40))), 0)
    assert len(affinity) == 4 and affinity.owners(keys) == []  # least recently used forgotten


class _Running:
    """A replica process that runs (what the router asks of one)."""

    pid = 1
    exit_code: int | None = None


def test_router_prefers_a_warm_replica_within_the_slack(tmp_path):
    router = Router("t", "model", None, EngineConfig(), 3, tmp_path, affinity_slack_tokens=1000)
    try:
        for replica in router.replicas:
            replica.slot.state, replica.slot.unit = "serving", _Running()
        prompt = list(range(300))
        keys = prefix_keys(prompt)
        assert router._pick(set(), keys).replica_id == 0  # nobody holds it: the least loaded
        router.affinity.record(keys, 2)
        router.replicas[2].outstanding_tokens = 900
        assert router._pick(set(), keys).replica_id == 2  # warm and within the slack
        router.replicas[2].outstanding_tokens = 1001
        assert router._pick(set(), keys).replica_id == 0  # too busy: spill to the least loaded
        router.affinity.record(keys, 1)
        router.replicas[1].outstanding_tokens = 500
        assert router._pick(set(), keys).replica_id == 1  # the least loaded of the warm ones
        assert router._pick({router.replicas[1]}, keys).replica_id == 0  # refused: cold, least loaded
        router.replicas[1].slot.unit.exit_code = -9  # dead
        assert router._pick(set(), keys).replica_id == 0
    finally:
        router.socket.close()
