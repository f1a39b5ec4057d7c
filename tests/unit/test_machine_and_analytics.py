"""Machine opens and clicks; analytics arithmetic."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tracker import analytics, machine

SENT = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
LATER = SENT + timedelta(hours=3)
SAFARI = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"


def test_a_person_opening_later_is_human() -> None:
    verdict = machine.classify_open(user_agent=SAFARI, ip="203.0.113.7", sent_at=SENT, at=LATER)
    assert verdict == machine.HUMAN


@pytest.mark.parametrize(
    ("agent", "ip", "at", "reason"),
    [
        ("Mozilla/5.0", "203.0.113.7", LATER, "bare user agent"),
        (SAFARI, "17.58.101.2", LATER, "Apple network"),
        ("Mimecast-Image-Proxy/1.0", "198.51.100.1", LATER, "automated agent"),
        (SAFARI, "203.0.113.7", SENT + timedelta(seconds=1), "right after delivery"),
    ],
)
def test_machine_opens_are_flagged(agent: str, ip: str, at: datetime, reason: str) -> None:
    verdict = machine.classify_open(user_agent=agent, ip=ip, sent_at=SENT, at=at)
    assert verdict.machine and reason in (verdict.reason or "")


def test_gmail_image_proxy_is_a_person_opening() -> None:
    agent = (
        "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
    )
    assert not machine.classify_open(
        user_agent=agent, ip="66.102.8.1", sent_at=SENT, at=LATER
    ).machine


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"user_agent": SAFARI, "method": "HEAD"}, "HEAD"),
        ({"user_agent": ""}, "no user agent"),
        ({"user_agent": "Barracuda Sentinel (EE)"}, "scanner"),
        ({"user_agent": SAFARI, "at": SENT + timedelta(seconds=4)}, "right after delivery"),
        ({"user_agent": SAFARI, "other_links_nearby": 1}, "several links"),
        (
            {"user_agent": SAFARI, "delivered_at": LATER - timedelta(seconds=3)},
            "right after delivery",  # the provider delivered it hours after the hand-off
        ),
    ],
)
def test_scanner_clicks_are_flagged(kwargs: dict[str, object], reason: str) -> None:
    args: dict[str, object] = {"ip": "203.0.113.7", "sent_at": SENT, "at": LATER, **kwargs}
    verdict = machine.classify_click(**args)  # type: ignore[arg-type]
    assert verdict.machine and reason in (verdict.reason or "")


def test_a_person_clicking_is_human() -> None:
    assert not machine.classify_click(
        user_agent=SAFARI, ip="203.0.113.7", sent_at=SENT, at=LATER
    ).machine
    # Delivered a minute before the click: a person reading it as it arrived.
    assert not machine.classify_click(
        user_agent=SAFARI,
        ip="203.0.113.7",
        sent_at=SENT,
        at=LATER,
        delivered_at=LATER - timedelta(minutes=1),
    ).machine


def test_provider_flags_are_honoured() -> None:
    assert machine.provider_open_is_machine({"sg_machine_open": True})
    assert machine.provider_open_is_machine({"useragent": "Mozilla/5.0"})
    assert not machine.provider_open_is_machine({"useragent": SAFARI})


def test_two_proportion_test_matches_the_textbook() -> None:
    # 120/1000 against 90/1000: pooled p = 0.105, z = 2.1883, two-sided p = 0.02865
    result = analytics.two_proportion_test(120, 1000, 90, 1000)
    assert result is not None
    assert result.z == pytest.approx(2.1883, abs=1e-3)
    assert result.p_value == pytest.approx(0.02865, abs=1e-4)
    assert analytics.two_proportion_test(0, 0, 1, 10) is None
    assert analytics.two_proportion_test(0, 10, 0, 10) is None  # no variance


@settings(max_examples=200)
@given(st.integers(0, 500), st.integers(1, 500), st.integers(0, 500), st.integers(1, 500))
def test_two_proportion_test_is_symmetric_and_bounded(x1: int, n1: int, x2: int, n2: int) -> None:
    x1, x2 = min(x1, n1), min(x2, n2)
    a = analytics.two_proportion_test(x1, n1, x2, n2)
    b = analytics.two_proportion_test(x2, n2, x1, n1)
    if a is None:
        assert b is None
        return
    assert b is not None
    assert a.z == pytest.approx(-b.z) and a.p_value == pytest.approx(b.p_value)
    assert 0 <= a.p_value <= 1 and not math.isnan(a.z)


def test_report_sums_every_count_per_step_and_in_totals() -> None:
    row: dict[str, int | str] = {k: n + 1 for n, k in enumerate(analytics.COUNTS)}
    row.update(step_index=0, variant="")
    result = analytics.report([row, dict(row, step_index=1)])
    for n, key in enumerate(analytics.COUNTS):
        assert result["totals"][key] == 2 * (n + 1), key
        assert result["steps"][1]["counts"][key] == n + 1, key
    assert {"machine_clicked", "rejected", "delayed"} <= set(analytics.COUNTS)


def test_report_counts_rates_and_variant_significance() -> None:
    def row(step: int, variant: str, sent: int, opened: int, replied: int) -> dict[str, int | str]:
        base: dict[str, int | str] = dict.fromkeys(analytics.COUNTS, 0)
        base.update(
            step_index=step,
            variant=variant,
            sent=sent,
            delivered=sent,
            opened=opened,
            clicked=opened // 2,
            replied=replied,
        )
        return base

    result = analytics.report(
        [row(0, "a", 1000, 400, 90), row(0, "b", 1000, 420, 120), row(1, "", 500, 100, 10)]
    )
    assert result["totals"]["sent"] == 2500 and result["totals"]["replied"] == 220
    assert result["rates"]["reply_rate"] == pytest.approx(0.088)
    step0 = result["steps"][0]
    assert [v["variant"] for v in step0["variants"]] == ["a", "b"]
    assert step0["rates"]["click_rate"] == pytest.approx(410 / 820, abs=1e-4)  # of opens
    reply = next(s for s in step0["significance"] if s["metric"] == "reply_rate")
    assert reply["control"] == "a" and reply["variant"] == "b" and reply["significant"]
    assert result["steps"][1]["significance"] == []
