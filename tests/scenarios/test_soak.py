"""The soak's shortened run, and proof that its leak detector can fail
(RELIABILITY R24; the full soak is `make soak`)."""

from __future__ import annotations

from bench.soak import judge_rss, soak


def test_the_rss_judge_passes_a_flat_series_and_fails_a_growing_one() -> None:
    flat = [300e6 + (i % 3) * 1e5 for i in range(40)]
    assert judge_rss(flat)[3] == []
    growing = [300e6 + i * 2e6 for i in range(40)]
    assert judge_rss(growing)[3]


async def test_a_short_soak_leaks_nothing() -> None:
    verdict = await soak(requests=3000, leak_kib=0, interval=0.2, idle=15)
    assert verdict.errors == 0
    assert verdict.ok > 2800
    assert verdict.websocket > 0  # the mix has streams in it
    assert verdict.tasks_baseline > 0  # the task gauge was read
    assert verdict.passed, verdict.failures


async def test_the_soak_detects_a_leak_of_10_kib_per_request() -> None:
    verdict = await soak(requests=3000, leak_kib=10, interval=0.2, idle=15)
    assert not verdict.passed
    assert any("RSS" in failure for failure in verdict.failures)
