"""bench.load's pooling of interleaved rounds: the figures bench.run reports for a scenario run several times."""

from bench.load import LoadResult, RequestRecord, in_rounds


def _record(latency_s: float, tokens: int) -> RequestRecord:
    return RequestRecord(latency_s, latency_s / 4, tokens, True, tuple(range(tokens)))


def test_pooled_rounds_are_total_tokens_over_total_wall_time_with_every_request() -> None:
    fast = LoadResult([_record(1.0, 32), _record(1.2, 32)], wall_s=2.0)  # 32 tokens/s
    slow = LoadResult([_record(3.0, 32)], wall_s=4.0)  # 8 tokens/s
    pooled = LoadResult.pooled([fast, slow])
    assert pooled.tokens_per_s == 96 / 6.0  # not the mean of the rounds' rates (20)
    assert [r.latency_s for r in pooled.records] == [1.0, 1.2, 3.0]
    assert pooled.latency(100) == 3.0 and pooled.latency(0) == 1.0


def test_loads_run_in_turn_round_after_round_and_come_back_pooled() -> None:
    calls: list[str] = []

    def load(label: str, wall_s: float):
        def run() -> LoadResult:
            calls.append(label)
            return LoadResult([_record(wall_s, 32)], wall_s)
        return run

    pooled = in_rounds({"base": load("base", 1.0), "adapter": load("adapter", 2.0)}, rounds=3)
    assert calls == ["base", "adapter"] * 3  # interleaved, not three of one then three of the other
    assert list(pooled) == ["base", "adapter"]
    assert len(pooled["adapter"].records) == 3 and pooled["adapter"].wall_s == 6.0
