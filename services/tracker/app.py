"""Tracker wiring: consumer, tracking endpoints, webhooks."""

from __future__ import annotations

import asyncio
import hmac
import html
import logging
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from schemas import topics
from schemas.events import EmailFailed, EmailSent, EngagementType, WebhookReceived
from services.runtime import tokens
from services.runtime.consumer import Rejection, TopicHandler
from services.runtime.kafka import OutgoingRecord, publish_all
from services.runtime.service import Service
from services.runtime.settings import TrackerSettings
from services.tracker import domain, handlers, repo

log = logging.getLogger(__name__)

NOT_FOUND = "unknown or invalid link"


class TrackerService(Service[TrackerSettings]):
    name = "tracker"
    migrations_dir = Path(__file__).parent / "migrations"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        if s.tracking_secret is None:
            raise ValueError("TOUCHSTREAM_TRACKING_SECRET must be set: it verifies tracking links")
        self.secret = s.tracking_secret.get_secret_value().encode()

    def topic_handlers(self) -> dict[str, TopicHandler]:
        return {topics.EMAIL_SENT: self._on_email_outcome, topics.WEBHOOKS_RAW: self._on_webhook}

    def produced_topics(self) -> list[str]:
        return [topics.ENGAGEMENT, topics.WEBHOOKS_RAW]

    async def _on_email_outcome(
        self, conn: asyncpg.Connection, events: list[EmailSent | EmailFailed]
    ) -> None:
        await handlers.handle_email_outcome(conn, events, now=self.clock.now())

    async def _on_webhook(
        self, conn: asyncpg.Connection, events: list[WebhookReceived]
    ) -> list[Rejection]:
        return await handlers.handle_webhook(conn, events, now=self.clock.now())

    # ---------------------------------------------------------------- tracking

    async def _message_for(
        self, token: str, kind: str
    ) -> tuple[tokens.TokenClaims, asyncpg.Record]:
        """The registered message a genuine token points at; 404 for anything else.

        A genuine token may arrive before its EmailSent is registered (the
        recipient is quick, the pipeline is busy): wait a moment for it."""
        claims = tokens.verify(self.secret, token, kind)
        if claims is None:
            raise HTTPException(404, NOT_FOUND)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.registry_wait_seconds
        while True:
            message = await repo.message(self.pool, claims.message_id)
            if message is not None:
                return claims, message
            if loop.time() >= deadline:
                raise HTTPException(404, NOT_FOUND)
            await asyncio.sleep(0.1)

    async def _record(
        self, message: asyncpg.Record, engagement_type: EngagementType, **kwargs: Any
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            event = await handlers.record_engagement(
                conn, message, engagement_type, occurred_at=self.clock.now(), **kwargs
            )
        if event is not None:
            self.wake_relay()

    def add_routes(self, app: FastAPI) -> None:
        @app.get("/t/o/{token}", tags=["tracking"], response_class=Response)
        async def open_pixel(token: str, request: Request) -> Response:
            claims, message = await self._message_for(token, "open")
            await self._record(
                message,
                EngagementType.OPENED,
                source="pixel",
                dedupe_key=domain.open_dedupe_key(claims.message_id, self.clock.now()),
                detail={"user_agent": request.headers.get("user-agent", "")[:300]},
            )
            return Response(
                domain.PIXEL_GIF,
                media_type="image/gif",
                headers={"Cache-Control": "no-store, no-cache, must-revalidate, max-age=0"},
            )

        @app.get("/t/c/{token}", tags=["tracking"])
        async def click(token: str, request: Request) -> RedirectResponse:
            claims, message = await self._message_for(token, "click")
            links = list(message["links"] or [])
            if claims.link is None or not 0 <= claims.link < len(links):
                raise HTTPException(404, NOT_FOUND)
            url = links[claims.link]
            await self._record(
                message,
                EngagementType.CLICKED,
                source="click",
                url=url,
                dedupe_key=domain.click_dedupe_key(
                    claims.message_id, claims.link, self.clock.now()
                ),
                detail={"user_agent": request.headers.get("user-agent", "")[:300]},
            )
            return RedirectResponse(url, status_code=302)

        @app.get("/u/{token}", tags=["tracking"], response_class=HTMLResponse)
        async def unsubscribe_page(token: str) -> HTMLResponse:
            # GET never unsubscribes: link scanners fetch every URL in a message.
            _claims, message = await self._message_for(token, "unsubscribe")
            address = html.escape(message["to_email"])
            return HTMLResponse(
                "<!DOCTYPE html><html><head><title>Unsubscribe</title></head><body>"
                f"<h1>Unsubscribe {address}?</h1>"
                "<p>You will not receive further emails from this sender.</p>"
                f'<form method="post" action="/u/{html.escape(token)}">'
                '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
                '<button type="submit">Unsubscribe</button></form></body></html>'
            )

        @app.post("/u/{token}", tags=["tracking"], response_class=HTMLResponse)
        async def unsubscribe(token: str, request: Request) -> HTMLResponse:
            """RFC 8058 one-click unsubscribe (body ``List-Unsubscribe=One-Click``), and the
            confirmation form of the unsubscribe page."""
            _claims, message = await self._message_for(token, "unsubscribe")
            body = (await request.body())[:1024].decode(errors="replace")
            await self._record(
                message,
                EngagementType.UNSUBSCRIBED,
                source="unsubscribe",
                dedupe_key=domain.unsubscribe_dedupe_key(message["message_id"]),
                detail={"one_click": "List-Unsubscribe=One-Click" in body},
            )
            return HTMLResponse(
                "<!DOCTYPE html><html><body><h1>You are unsubscribed</h1>"
                f"<p>{html.escape(message['to_email'])} will receive no further emails.</p>"
                "</body></html>"
            )

        @app.post("/webhooks/inbound", tags=["webhooks"], status_code=202)
        async def inbound_email(request: Request) -> dict[str, Any]:
            """A raw RFC 822 email (a reply), ``Authorization: Bearer <token>``."""
            expected = self.settings.inbound_token
            given = request.headers.get("authorization", "")
            if expected is None:
                raise HTTPException(503, "inbound webhook is not configured")
            if not given.lower().startswith("bearer ") or not hmac.compare_digest(
                given[7:].strip().encode(), expected.get_secret_value().encode()
            ):
                raise HTTPException(401, "missing or wrong bearer token")
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type not in ("message/rfc822", "text/plain", "application/octet-stream"):
                raise HTTPException(415, "send the raw email as Content-Type: message/rfc822")
            body = await self._read_limited(request)
            try:
                domain.parse_inbound(body)
            except domain.InboundInvalid as exc:
                raise HTTPException(400, f"not an RFC 822 message: {exc}") from exc
            event = WebhookReceived.from_request("inbound", content_type, body, {}).model_copy(
                update={"occurred_at": self.clock.now()}
            )
            await publish_all(
                self.broker,
                [
                    OutgoingRecord(
                        topics.WEBHOOKS_RAW,
                        event.kafka_key(),
                        event.to_bytes(),
                        {"event_type": event.event_type},
                    )
                ],
            )
            return {"accepted": True, "event_id": str(event.event_id)}

    async def _read_limited(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"body larger than {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
