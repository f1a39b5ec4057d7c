"""Analytics from the tracker's own data: per sequence, step and variant — sent,
delivered, opened and clicked (human and machine), replied, bounced (refused outright
included), delayed, unsubscribed, complained; rates; a two-proportion test between
variants; a daily series; CSV."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from fastapi import APIRouter, FastAPI, HTTPException, Query
from fastapi.responses import Response

if TYPE_CHECKING:
    from services.tracker.app import TrackerService

COUNTS = (
    "sent",
    "delivered",
    "opened",
    "machine_opened",
    "clicked",
    "machine_clicked",
    "replied",
    "bounced",
    "hard_bounced",
    "rejected",
    "delayed",
    "unsubscribed",
    "complained",
    "auto_replied",
)

#: Per (step, variant): what happened to each message (each counts once per kind).
#: The sequence's messages are chosen first and only their events are read.
#: A message counts as ``opened``/``clicked`` when a person did it; ``machine_opened`` /
#: ``machine_clicked`` when only machines did. A delivery the server refused outright
#: (``rejections``) was sent and bounced (``rejected``); when its step has no other
#: sign of its variant it counts under no variant. ``delayed``: a delay notice came.
_PER_MESSAGE = """
WITH m AS MATERIALIZED (
    SELECT message_id, delivery_key, sequence_id, step_id, step_index,
        coalesce(variant, '') AS variant
    FROM messages
    WHERE tenant_id = $1 AND sequence_key = $2 AND NOT dry_run
      AND ($3::int IS NULL OR sequence_version = $3)
),
e AS (
    SELECT ev.message_id,
        bool_or(ev.type = 'delivered') AS delivered,
        bool_or(ev.type = 'opened' AND NOT ev.machine) AS opened,
        bool_or(ev.type = 'opened' AND ev.machine) AS machine_opened,
        bool_or(ev.type = 'clicked' AND NOT ev.machine) AS clicked,
        bool_or(ev.type = 'clicked' AND ev.machine) AS machine_clicked,
        bool_or(ev.type = 'replied') AS replied,
        bool_or(ev.type = 'bounced') AS bounced,
        bool_or(ev.type = 'bounced'
            AND coalesce(ev.detail->>'bounce_type', 'hard') = 'hard') AS hard_bounced,
        bool_or(ev.type = 'delayed') AS delayed,
        bool_or(ev.type = 'unsubscribed') AS unsubscribed,
        bool_or(ev.type = 'complained') AS complained,
        bool_or(ev.type = 'auto_replied') AS auto_replied
    FROM engagement_events ev JOIN m ON m.message_id = ev.message_id
    GROUP BY ev.message_id
),
r AS (
    SELECT delivery_key, step_index, bounce_type FROM rejections
    WHERE tenant_id = $1 AND sequence_id IN (SELECT sequence_id FROM m)
      AND ($3::int IS NULL OR step_id IN (SELECT step_id FROM m))
),
d AS (
    SELECT m.step_index, m.variant, e.delivered, e.opened, e.machine_opened, e.clicked,
        e.machine_clicked, e.replied, e.bounced, e.hard_bounced, e.delayed, e.unsubscribed,
        e.complained, e.auto_replied, r.delivery_key IS NOT NULL AS rejected,
        r.bounce_type AS rejected_as
    FROM m LEFT JOIN e ON e.message_id = m.message_id
        LEFT JOIN r ON r.delivery_key = m.delivery_key
    UNION ALL
    SELECT r.step_index, '', false, false, false, false, false, false, false, false, false,
        false, false, false, true, r.bounce_type
    FROM r WHERE NOT EXISTS (SELECT 1 FROM m WHERE m.delivery_key = r.delivery_key)
)
SELECT step_index, variant,
    count(*) AS sent,
    count(*) FILTER (WHERE delivered) AS delivered,
    count(*) FILTER (WHERE opened) AS opened,
    count(*) FILTER (WHERE machine_opened AND NOT coalesce(opened, false)) AS machine_opened,
    count(*) FILTER (WHERE clicked) AS clicked,
    count(*) FILTER (WHERE machine_clicked AND NOT coalesce(clicked, false)) AS machine_clicked,
    count(*) FILTER (WHERE replied) AS replied,
    count(*) FILTER (WHERE bounced OR rejected) AS bounced,
    count(*) FILTER (WHERE hard_bounced OR rejected_as = 'hard') AS hard_bounced,
    count(*) FILTER (WHERE rejected) AS rejected,
    count(*) FILTER (WHERE delayed) AS delayed,
    count(*) FILTER (WHERE unsubscribed) AS unsubscribed,
    count(*) FILTER (WHERE complained) AS complained,
    count(*) FILTER (WHERE auto_replied) AS auto_replied
FROM d
GROUP BY step_index, variant
ORDER BY step_index, variant
"""

#: Per day: messages sent (refused ones included) and, per kind, messages with a
#: person's engagement (or a bounce, a delay...) that day.
_DAILY = """
WITH m AS MATERIALIZED (
    SELECT message_id, delivery_key, sequence_id, sent_at FROM messages
    WHERE tenant_id = $1 AND sequence_key = $2 AND NOT dry_run
),
r AS (
    SELECT delivery_key, occurred_at FROM rejections
    WHERE tenant_id = $1 AND sequence_id IN (SELECT sequence_id FROM m) AND occurred_at >= $3
)
SELECT day, kind, count(DISTINCT delivery_key) AS n FROM (
    SELECT date_trunc('day', m.sent_at) AS day, 'sent' AS kind, m.delivery_key
    FROM m WHERE m.sent_at >= $3
    UNION ALL
    SELECT date_trunc('day', r.occurred_at), 'sent', r.delivery_key
    FROM r WHERE NOT EXISTS (SELECT 1 FROM m WHERE m.delivery_key = r.delivery_key)
    UNION ALL
    SELECT date_trunc('day', r.occurred_at), 'bounced', r.delivery_key FROM r
    UNION ALL
    SELECT date_trunc('day', e.occurred_at), e.type, m.delivery_key
    FROM engagement_events e JOIN m ON m.message_id = e.message_id
    WHERE e.tenant_id = $1 AND NOT e.machine AND e.occurred_at >= $3
) t GROUP BY day, kind ORDER BY day, kind
"""


def rates(counts: dict[str, int]) -> dict[str, float]:
    def ratio(a: str, b: str) -> float:
        return round(counts[a] / counts[b], 4) if counts[b] else 0.0

    return {
        "delivery_rate": ratio("delivered", "sent"),
        "open_rate": ratio("opened", "sent"),
        "click_rate": ratio("clicked", "opened"),  # of opens
        "click_through_rate": ratio("clicked", "sent"),
        "reply_rate": ratio("replied", "sent"),
        "bounce_rate": ratio("bounced", "sent"),
        "unsubscribe_rate": ratio("unsubscribed", "sent"),
        "complaint_rate": ratio("complained", "sent"),
    }


@dataclass(frozen=True, slots=True)
class TwoProportion:
    z: float
    p_value: float


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> TwoProportion | None:
    """Two-sided pooled z-test of p1 == p2; None when it cannot be computed."""
    if n1 == 0 or n2 == 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:
        return None
    z = (x1 / n1 - x2 / n2) / math.sqrt(variance)
    return TwoProportion(round(z, 4), round(math.erfc(abs(z) / math.sqrt(2)), 6))


def _empty() -> dict[str, int]:
    return dict.fromkeys(COUNTS, 0)


def _add(into: dict[str, int], row: dict[str, int]) -> None:
    for key in COUNTS:
        into[key] += int(row[key])


def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sequence report from per (step, variant) rows."""
    totals = _empty()
    steps: dict[int, dict[str, Any]] = {}
    for row in rows:
        _add(totals, row)
        step = steps.setdefault(
            row["step_index"], {"step_index": row["step_index"], "counts": _empty(), "variants": []}
        )
        _add(step["counts"], row)
        if row["variant"]:
            counts = {k: int(row[k]) for k in COUNTS}
            step["variants"].append(
                {"variant": row["variant"], "counts": counts, "rates": rates(counts)}
            )
    for step in steps.values():
        step["rates"] = rates(step["counts"])
        step["significance"] = significance(step["variants"])
    return {"totals": totals, "rates": rates(totals), "steps": list(steps.values())}


def significance(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each variant against the first (the control), for reply, open and click rates."""
    if len(variants) < 2:
        return []
    control = variants[0]
    results = []
    for other in variants[1:]:
        for metric, numerator, denominator in (
            ("reply_rate", "replied", "sent"),
            ("open_rate", "opened", "sent"),
            ("click_rate", "clicked", "opened"),
        ):
            c, o = control["counts"], other["counts"]
            test = two_proportion_test(o[numerator], o[denominator], c[numerator], c[denominator])
            results.append(
                {
                    "metric": metric,
                    "control": control["variant"],
                    "variant": other["variant"],
                    "z": test.z if test else None,
                    "p_value": test.p_value if test else None,
                    "significant": bool(test and test.p_value < 0.05),
                }
            )
    return results


async def per_step_rows(
    pool: asyncpg.Pool, tenant_id: str, sequence: str, version: int | None
) -> list[dict[str, Any]]:
    return [dict(r) for r in await pool.fetch(_PER_MESSAGE, tenant_id, sequence, version)]


def install(app: FastAPI, service: TrackerService) -> None:
    router = APIRouter(prefix="/analytics", tags=["analytics"])

    @router.get("/sequences/{sequence}")
    async def sequence_report(
        sequence: str, tenant_id: str = "default", version: int | None = Query(None, ge=1)
    ) -> dict[str, Any]:
        rows = await per_step_rows(service.pool, tenant_id, sequence, version)
        if not rows:
            raise HTTPException(404, f"no messages sent for sequence {sequence!r}")
        return {"sequence": sequence, "version": version, **report(rows)}

    @router.get("/sequences/{sequence}/daily")
    async def daily(
        sequence: str, tenant_id: str = "default", days: int = Query(30, ge=1, le=366)
    ) -> dict[str, Any]:
        from datetime import timedelta

        since = service.clock.now() - timedelta(days=days)
        series: dict[str, dict[str, int]] = {}
        for row in await service.pool.fetch(_DAILY, tenant_id, sequence, since):
            day = row["day"].date().isoformat()
            series.setdefault(day, {})[row["kind"]] = int(row["n"])
        return {"sequence": sequence, "days": [{"day": d, **c} for d, c in sorted(series.items())]}

    @router.get("/sequences/{sequence}/export.csv")
    async def export(sequence: str, tenant_id: str = "default") -> Response:
        rows = await per_step_rows(service.pool, tenant_id, sequence, None)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        rate_names = list(rates(_empty()))
        writer.writerow(["sequence", "step_index", "variant", *COUNTS, *rate_names])
        for row in rows:
            counts = {k: int(row[k]) for k in COUNTS}
            computed = rates(counts)
            writer.writerow(
                [
                    sequence,
                    row["step_index"],
                    row["variant"],
                    *(counts[k] for k in COUNTS),
                    *(computed[k] for k in rate_names),
                ]
            )
        return Response(
            buffer.getvalue(),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{sequence}.csv"'},
        )

    app.include_router(router)
