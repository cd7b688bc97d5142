"""The pieces of multi-process training that need no processes: row shares and the strategy check.

The processes themselves are tested in tests/integration/test_distributed.py (torchrun, gloo)."""

import pytest

from grpokit.distributed import check_strategy, sample_ranges, share
from grpokit.errors import ConfigError


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
