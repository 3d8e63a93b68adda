"""Format the benchmark's results as one Markdown report (table, ratios, adapter lifecycle times)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .load import LoadResult

# Targets the ratios are judged against.
MIXED_OVER_SINGLE_TARGET = 0.9
OURS_OVER_NAIVE_TARGET = 5.0


@dataclass
class BenchReport:
    """Everything one run measured, plus the facts needed to reproduce it."""

    header: dict[str, str]
    scenarios: dict[str, LoadResult] = field(default_factory=dict)  # label -> result, in run order
    upload_s: list[float] = field(default_factory=list)
    delete_s: list[float] = field(default_factory=list)
    # server -> token ids of its warm-up requests (same prompts and adapters on both servers)
    warmup_tokens: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    extra_ratios: list[str] = field(default_factory=list)  # ratio lines of the many-adapter scenarios
    notes: list[str] = field(default_factory=list)  # what could not be measured, and why


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _ratio(report: BenchReport, numerator: str, denominator: str) -> float | None:
    a, b = report.scenarios.get(numerator), report.scenarios.get(denominator)
    return None if a is None or b is None else a.tokens_per_s / b.tokens_per_s


def _table(report: BenchReport) -> list[str]:
    lines = ["| scenario | requests | tokens | tokens/s | p50 latency s | p99 latency s | p50 TTFT s | p99 TTFT s | "
             "TTFT from |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for label, result in report.scenarios.items():
        tokens = sum(r.completion_tokens for r in result.records)
        source = "stream" if all(r.streamed for r in result.records) else "latency (no stream)"
        lines.append(f"| {label} | {len(result.records)} | {tokens} | {_num(result.tokens_per_s, 1)} | "
                     f"{_num(result.latency(50))} | {_num(result.latency(99))} | {_num(result.ttft(50))} | "
                     f"{_num(result.ttft(99))} | {source} |")
    return lines


def _ratios(report: BenchReport, single: str, mixed: str, base: str, naive: str, fused: str) -> list[str]:
    lines = []
    if (r := _ratio(report, fused, single)) is not None:
        lines.append(f"- fused activation speed-up over the unfused single adapter: **{r:.2f}x**")
    if (r := _ratio(report, mixed, single)) is not None:
        verdict = "meets" if r >= MIXED_OVER_SINGLE_TARGET else "misses"
        lines.append(f"- mixed / single throughput: **{r:.2f}** ({verdict} target >= {MIXED_OVER_SINGLE_TARGET})")
    if (r := _ratio(report, mixed, naive)) is not None:
        verdict = "meets" if r >= OURS_OVER_NAIVE_TARGET else "misses"
        lines.append(f"- ours mixed / naive PEFT throughput: **{r:.2f}x** ({verdict} target >= "
                     f"{OURS_OVER_NAIVE_TARGET:g}x)")
    if (r := _ratio(report, base, single)) is not None:
        # (1/tps_single - 1/tps_base) / (1/tps_base) = tps_base / tps_single - 1
        lines.append(f"- LoRA overhead per token vs the bare base model: **{(r - 1) * 100:+.1f}%** "
                     "(1/tps_single - 1/tps_base, relative to 1/tps_base)")
    ours, naive_tokens = report.warmup_tokens.get("ours"), report.warmup_tokens.get("naive")
    if ours and naive_tokens:
        same = sum(a == b for a, b in zip(ours, naive_tokens, strict=True))
        lines.append(f"- greedy tokens, ours vs naive PEFT, warm-up requests (same prompt and adapter): "
                     f"{same}/{len(ours)} identical")
    return lines or ([] if report.extra_ratios else ["- (not enough scenarios run for any ratio)"])


def _lifecycle(report: BenchReport) -> list[str]:
    def stats(values: list[float]) -> str:
        if not values:
            return "n/a"
        return f"mean {sum(values) / len(values):.3f} s, max {max(values):.3f} s (n={len(values)})"

    return [f"- upload to ready (`POST /adapters` start to 201): {stats(report.upload_s)}",
            f"- delete (`DELETE /adapters/{{id}}`): {stats(report.delete_s)}"]


def render(report: BenchReport, single: str, mixed: str, base: str, naive: str, fused: str) -> str:
    """The whole report as Markdown; the scenario labels name which rows the ratios compare."""
    lines = ["# Benchmark results", ""]
    lines += [f"- {key}: {value}" for key, value in report.header.items()]
    lines += ["", *_table(report), "", "## Ratios", "", *_ratios(report, single, mixed, base, naive, fused),
              *report.extra_ratios]
    if report.notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in report.notes)]
    if report.upload_s or report.delete_s:
        lines += ["", "## Adapter lifecycle (ours)", "", *_lifecycle(report)]
    lines.append("")
    return "\n".join(lines)


def write_section(path: Path, name: str, text: str) -> None:
    """Put `text` between `<!-- name:begin -->` and `<!-- name:end -->` in `path`, keeping the rest of the
    file (the hand-written sections) as it is; the markers are appended at the end when absent."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else ""
    head, found, rest = old.partition(begin)
    if found and end in rest:
        new = head + block + rest.partition(end)[2]
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + block + "\n"
    path.write_text(new)
