"""bench.load's pooling of interleaved rounds: the figures bench.run reports for a scenario run several times."""

from bench.load import LoadResult, RequestRecord


def _record(latency_s: float, tokens: int) -> RequestRecord:
    return RequestRecord(latency_s, latency_s / 4, tokens, True, tuple(range(tokens)))


def test_pooled_rounds_are_total_tokens_over_total_wall_time_with_every_request() -> None:
    fast = LoadResult([_record(1.0, 32), _record(1.2, 32)], wall_s=2.0)  # 32 tokens/s
    slow = LoadResult([_record(3.0, 32)], wall_s=4.0)  # 8 tokens/s
    pooled = LoadResult.pooled([fast, slow])
    assert pooled.tokens_per_s == 96 / 6.0  # not the mean of the rounds' rates (20)
    assert [r.latency_s for r in pooled.records] == [1.0, 1.2, 3.0]
    assert pooled.latency(100) == 3.0 and pooled.latency(0) == 1.0
