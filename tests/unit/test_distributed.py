"""The pieces of multi-process training that need no processes: row shares and the strategy check.

The processes themselves are tested in tests/integration/test_distributed.py (torchrun, gloo)."""

import pytest

from grpokit.errors import ConfigError
from grpokit.runtime import distributed
from grpokit.runtime.distributed import check_strategy, sample_ranges, share


@pytest.mark.parametrize("rows,count", [(12, 2), (12, 5), (3, 4), (24, 3)])
def test_process_shares_cover_the_rows_once(rows, count):
    shares = [share(rows, count, i) for i in range(count)]
    assert [r for lo, hi in shares for r in range(lo, hi)] == list(range(rows))
    for lo, hi in shares:
        first, ranges = sample_ranges(lo, hi, 4)
        assert [(first + p) * 4 + j for p, r in enumerate(ranges) for j in r] == list(range(lo, hi))


@pytest.mark.parametrize("kind", ["DistributedType.FSDP", "DistributedType.DEEPSPEED"])
def test_sharded_strategies_are_refused_with_the_way_out(kind):
    with pytest.raises(ConfigError, match=r"(?s)does not support yet.*--multi_gpu.*torchrun"):
        check_strategy(kind)
    check_strategy("DistributedType.MULTI_GPU")  # DDP passes
    check_strategy("DistributedType.MULTI_CPU")


def test_peer_lost_recognises_a_collective_whose_peer_left(monkeypatch):
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:28310. This is typically caused by a remote worker crashing. Check the logs.")
    assert not distributed.peer_lost(gloo)  # one process: never a lost peer
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.peer_lost(gloo)
    assert not distributed.peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not distributed.peer_lost(ValueError("Connection closed by peer"))
    message = distributed.peer_lost_message(gloo)
    assert message.startswith("process 1 of 2 stopped: another process of this job left a collective operation "
                              "(Connection closed by peer [127.0.0.1]:28310)")
    assert "--resume" in message
