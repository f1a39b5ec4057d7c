"""Analytics from the tracker's own data: per sequence, step and variant — sent,
delivered, opened (human and machine), clicked, replied, bounced, unsubscribed,
complained; rates; a two-proportion test between variants; a daily series; CSV."""

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
    "replied",
    "bounced",
    "hard_bounced",
    "unsubscribed",
    "complained",
    "auto_replied",
)

#: Per message: what happened to it (each message counts once per kind).
_PER_MESSAGE = """
WITH e AS (
    SELECT message_id,
        bool_or(type = 'delivered') AS delivered,
        bool_or(type = 'opened' AND NOT machine) AS opened,
        bool_or(type = 'opened' AND machine) AS machine_opened,
        bool_or(type = 'clicked' AND NOT machine) AS clicked,
        bool_or(type = 'replied') AS replied,
        bool_or(type = 'bounced') AS bounced,
        bool_or(type = 'bounced' AND coalesce(detail->>'bounce_type', 'hard') = 'hard')
            AS hard_bounced,
        bool_or(type = 'unsubscribed') AS unsubscribed,
        bool_or(type = 'complained') AS complained,
        bool_or(type = 'auto_replied') AS auto_replied
    FROM engagement_events WHERE tenant_id = $1 GROUP BY message_id
)
SELECT m.step_index, coalesce(m.variant, '') AS variant,
    count(*) AS sent,
    count(*) FILTER (WHERE e.delivered) AS delivered,
    count(*) FILTER (WHERE e.opened) AS opened,
    count(*) FILTER (WHERE e.machine_opened AND NOT coalesce(e.opened, false)) AS machine_opened,
    count(*) FILTER (WHERE e.clicked) AS clicked,
    count(*) FILTER (WHERE e.replied) AS replied,
    count(*) FILTER (WHERE e.bounced) AS bounced,
    count(*) FILTER (WHERE e.hard_bounced) AS hard_bounced,
    count(*) FILTER (WHERE e.unsubscribed) AS unsubscribed,
    count(*) FILTER (WHERE e.complained) AS complained,
    count(*) FILTER (WHERE e.auto_replied) AS auto_replied
FROM messages m LEFT JOIN e ON e.message_id = m.message_id
WHERE m.tenant_id = $1 AND m.sequence_key = $2 AND NOT m.dry_run
  AND ($3::int IS NULL OR m.sequence_version = $3)
GROUP BY m.step_index, coalesce(m.variant, '')
ORDER BY m.step_index, variant
"""

_DAILY = """
SELECT day, kind, n FROM (
    SELECT date_trunc('day', m.sent_at) AS day, 'sent' AS kind, count(*) AS n
    FROM messages m WHERE m.tenant_id = $1 AND m.sequence_key = $2 AND NOT m.dry_run
      AND m.sent_at >= $3 GROUP BY 1
    UNION ALL
    SELECT date_trunc('day', e.occurred_at), e.type, count(DISTINCT e.message_id)
    FROM engagement_events e JOIN messages m ON m.message_id = e.message_id
    WHERE e.tenant_id = $1 AND m.sequence_key = $2 AND NOT m.dry_run AND NOT e.machine
      AND e.occurred_at >= $3 GROUP BY 1, 2
) t ORDER BY day, kind
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
