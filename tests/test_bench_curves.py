"""Smoke test of `bench.curves` on a tiny config: the curves, the plot and the report run (no timing checked)."""

from __future__ import annotations

import argparse

import pytest

from bench.curves import CurveConfig, plot, render, run_curves
from bench.report import write_section
from service.devtools.demo_model import ensure_demo_model


def test_tiny_curves_plot_and_section(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model_dir = ensure_demo_model(tmp_path / "model")
    args = argparse.Namespace(device="cpu", dtype="float32", cache_dir=tmp_path / "cache")
    config = CurveConfig(distinct=(1, 2), ranks=(2, 4), limits=(), rows=2, rank_rows=2, rank_adapters=2,
                         rank_requests=2, max_new_tokens=2)
    curves = run_curves(model_dir, config, args)
    assert [c.x for c in curves] == [[1, 2], [2, 4]]
    assert all(t > 0 and b > 0 for c in curves for t, b in zip(c.tps, c.base_tps, strict=True))

    png = tmp_path / "scaling.png"
    plot(curves, png, "tiny")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    results = tmp_path / "results.md"
    results.write_text("# Benchmark results\n\n## Hand-written section\n\nkept\n")
    write_section(results, "bench.curves", render(curves, {"device": "cpu"}, png.name))
    write_section(results, "bench.curves", render(curves, {"device": "cpu, again"}, png.name))
    text = results.read_text()
    assert "kept" in text and "cpu, again" in text and text.count("<!-- bench.curves:begin -->") == 1
    assert "![throughput relative to the base model, three axes](scaling.png)" in text
    assert "| distinct adapters |" in text and "| LoRA rank |" in text
