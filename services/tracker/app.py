"""Tracker wiring: consumer, tracking endpoints, provider webhooks, analytics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import html
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import asyncpg
import httpx
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse

from schemas import topics
from schemas.events import EmailFailed, EmailSent, EngagementType, WebhookReceived
from services.runtime import tokens
from services.runtime.consumer import Rejection, TopicHandler
from services.runtime.kafka import OutgoingRecord, publish_all
from services.runtime.service import BackgroundLoop, Service
from services.runtime.settings import TrackerSettings
from services.tracker import analytics, domain, handlers, machine, repo, webhooks

log = logging.getLogger(__name__)

NOT_FOUND = "unknown or invalid link"
_SNS_HOST = re.compile(r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")
#: Headers kept with a raw webhook for the consumer (never credentials).
KEPT_HEADERS = ("content-type", "user-agent", "x-forwarded-for")


async def fetch_sns_certificate(url: str) -> bytes:
    """Production certificate fetch; the URL is checked by the verifier first."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
        response.raise_for_status()
        return response.content


class TrackerService(Service[TrackerSettings]):
    name = "tracker"
    migrations_dir = Path(__file__).parent / "migrations"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        if s.tracking_secret is None:
            raise ValueError("TOUCHSTREAM_TRACKING_SECRET must be set: it verifies tracking links")
        self.secret = s.tracking_secret.get_secret_value().encode()
        #: Injectable so tests run offline (the verifier checks the URL before fetching).
        self.fetch_certificate: Callable[[str], Awaitable[bytes]] = fetch_sns_certificate
        #: How an SNS subscription is confirmed (GET the SubscribeURL); injectable too.
        self.confirm_subscription: Callable[[str], Awaitable[None]] = self._confirm
        self.sns = webhooks.SnsVerifier(
            s.ses_topics(), self._fetch_certificate, tolerance=s.webhook_tolerance_seconds
        )

    async def _fetch_certificate(self, url: str) -> bytes:
        return await self.fetch_certificate(url)

    async def _confirm(self, url: str) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            (await client.get(url)).raise_for_status()

    def topic_handlers(self) -> dict[str, TopicHandler]:
        return {topics.EMAIL_SENT: self._on_email_outcome, topics.WEBHOOKS_RAW: self._on_webhook}

    def produced_topics(self) -> list[str]:
        return [topics.ENGAGEMENT, topics.WEBHOOKS_RAW]

    def background_loops(self) -> list[BackgroundLoop]:
        return [self.housekeeping]

    async def housekeeping(self, stop: asyncio.Event) -> None:
        """Forget webhook tokens older than the replay window (a replay is refused by
        its timestamp then); give up on parked replies no message has claimed."""
        while not stop.is_set():
            try:
                await repo.prune_tokens(self.pool, 2 * self.settings.webhook_tolerance_seconds)
                async with self.pool.acquire() as conn, conn.transaction():
                    expired = await repo.expire_parked_replies(
                        conn, self.clock.now() - domain.PARKED_REPLY_TTL
                    )
                    expired += await repo.expire_parked_events(
                        conn, self.clock.now() - domain.PARKED_REPLY_TTL
                    )
                if expired:
                    log.info("housekeeping: %d parked items expired unattributed", expired)
            except Exception as exc:
                log.warning("housekeeping: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 60)

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

    async def _publish_webhook(
        self, provider: str, request: Request, body: bytes
    ) -> dict[str, Any]:
        """Written to webhooks-raw (acknowledged by the brokers) before answering."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in KEPT_HEADERS}
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        event = WebhookReceived.from_request(
            provider, request.headers.get("content-type", content_type), body, headers
        ).model_copy(update={"occurred_at": self.clock.now()})
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

    def _check_inbound_token(self, request: Request) -> None:
        """Bearer token, or HTTP basic auth with the token as password (services such
        as SendGrid Inbound Parse only support credentials in the URL)."""
        expected = self.settings.inbound_token
        if expected is None:
            raise HTTPException(404, "inbound webhook is not configured")
        header = request.headers.get("authorization", "")
        given = ""
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        elif header.lower().startswith("basic "):
            try:
                given = base64.b64decode(header[6:].strip()).decode().split(":", 1)[1]
            except (ValueError, IndexError):
                given = ""
        if not given or not hmac.compare_digest(
            given.encode(), expected.get_secret_value().encode()
        ):
            raise HTTPException(401, "missing or wrong credentials")

    def _reject(self, exc: webhooks.WebhookRejected) -> HTTPException:
        return HTTPException(exc.status, exc.reason)

    def add_routes(self, app: FastAPI) -> None:
        settings = self.settings

        @app.get("/t/o/{token}", tags=["tracking"], response_class=Response)
        async def open_pixel(token: str, request: Request) -> Response:
            claims, message = await self._message_for(token, "open")
            now = self.clock.now()
            verdict = machine.classify_open(
                user_agent=request.headers.get("user-agent"),
                ip=_client_ip(request),
                sent_at=message["sent_at"],
                at=now,
            )
            await self._record(
                message,
                EngagementType.OPENED,
                source="pixel",
                machine=verdict.machine,
                dedupe_key=domain.open_dedupe_key(claims.message_id, now)
                + (":machine" if verdict.machine else ""),
                detail={
                    "user_agent": request.headers.get("user-agent", "")[:300],
                    **({"machine_reason": verdict.reason} if verdict.reason else {}),
                },
            )
            return Response(
                domain.PIXEL_GIF,
                media_type="image/gif",
                headers={"Cache-Control": "no-store, no-cache, must-revalidate, max-age=0"},
            )

        @app.api_route("/t/c/{token}", methods=["GET", "HEAD"], tags=["tracking"])
        async def click(token: str, request: Request) -> RedirectResponse:
            claims, message = await self._message_for(token, "click")
            links = list(message["links"] or [])
            if claims.link is None or not 0 <= claims.link < len(links):
                raise HTTPException(404, NOT_FOUND)
            url = links[claims.link]
            now = self.clock.now()
            async with self.pool.acquire() as conn, conn.transaction():
                event = await handlers.record_click(
                    conn,
                    message,
                    url=url,
                    occurred_at=now,
                    source="click",
                    dedupe_key=domain.click_dedupe_key(claims.message_id, claims.link, now),
                    user_agent=request.headers.get("user-agent"),
                    ip=_client_ip(request),
                    method=request.method,
                    first_party=True,
                    detail={"user_agent": request.headers.get("user-agent", "")[:300]},
                )
            if event is not None:
                self.wake_relay()
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

        # ------------------------------------------------------------ inbound mail

        @app.post("/webhooks/inbound", tags=["webhooks"], status_code=202)
        async def inbound_email(request: Request) -> dict[str, Any]:
            """A raw RFC 822 email (a reply, a bounce), ``Authorization: Bearer <token>``."""
            self._check_inbound_token(request)
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type not in ("message/rfc822", "text/plain", "application/octet-stream"):
                raise HTTPException(415, "send the raw email as Content-Type: message/rfc822")
            body = await self._read_limited(request)
            try:
                domain.parse_inbound(body)
            except domain.InboundInvalid as exc:
                raise HTTPException(400, f"not an RFC 822 message: {exc}") from exc
            return await self._publish_webhook("inbound", request, body)

        @app.post("/webhooks/inbound/sendgrid", tags=["webhooks"], status_code=202)
        async def inbound_sendgrid(request: Request) -> dict[str, Any]:
            """SendGrid Inbound Parse (multipart form; raw or parsed)."""
            self._check_inbound_token(request)
            body = await self._read_limited(request)
            try:
                webhooks.inbound_from_sendgrid_parse(body, request.headers.get("content-type", ""))
            except webhooks.WebhookRejected as exc:
                raise self._reject(exc) from exc
            return await self._publish_webhook("inbound-sendgrid", request, body)

        @app.post("/webhooks/inbound/mailgun", tags=["webhooks"], status_code=202)
        async def inbound_mailgun(request: Request) -> dict[str, Any]:
            """A Mailgun route's forward(), signed with the webhook signing key."""
            key = settings.mailgun_signing_key
            if key is None:
                raise HTTPException(404, "mailgun webhooks are not configured")
            body = await self._read_limited(request)
            content_type = request.headers.get("content-type", "")
            try:
                signature = webhooks.mailgun_route_signature(body, content_type)
                self._verify_mailgun(key.get_secret_value(), signature)
                webhooks.inbound_from_mailgun_route(body, content_type)
            except webhooks.WebhookRejected as exc:
                raise self._reject(exc) from exc
            return await self._publish_mailgun("inbound-mailgun", request, body, signature)

        # -------------------------------------------------------- provider events

        @app.post("/webhooks/sendgrid", tags=["webhooks"])
        async def sendgrid(request: Request) -> dict[str, Any]:
            """SendGrid Event Webhook, ECDSA-signed (Signed Event Webhook)."""
            key = settings.sendgrid_public_key
            if not key:
                raise HTTPException(404, "sendgrid webhooks are not configured")
            body = await self._read_limited(request)
            try:
                webhooks.verify_sendgrid(
                    key,
                    request.headers.get("x-twilio-email-event-webhook-signature", ""),
                    request.headers.get("x-twilio-email-event-webhook-timestamp", ""),
                    body,
                    now=time.time(),
                    tolerance=settings.webhook_tolerance_seconds,
                )
                webhooks.parse_sendgrid(body)
            except webhooks.WebhookRejected as exc:
                raise self._reject(exc) from exc
            return await self._publish_webhook("sendgrid", request, body)

        @app.post("/webhooks/mailgun", tags=["webhooks"])
        async def mailgun(request: Request) -> dict[str, Any]:
            """Mailgun webhooks: HMAC-SHA256 over timestamp + token; a token is used once."""
            key = settings.mailgun_signing_key
            if key is None:
                raise HTTPException(404, "mailgun webhooks are not configured")
            body = await self._read_limited(request)
            try:
                signature, _events = webhooks.parse_mailgun(body)
                self._verify_mailgun(key.get_secret_value(), signature)
            except webhooks.WebhookRejected as exc:
                raise self._reject(exc) from exc
            return await self._publish_mailgun("mailgun", request, body, signature)

        @app.post("/webhooks/postmark", tags=["webhooks"])
        async def postmark(request: Request) -> dict[str, Any]:
            """Postmark webhooks, with basic-auth credentials in the webhook URL."""
            if not settings.postmark_username or settings.postmark_password is None:
                raise HTTPException(404, "postmark webhooks are not configured")
            try:
                webhooks.verify_basic_auth(
                    request.headers.get("authorization"),
                    settings.postmark_username,
                    settings.postmark_password.get_secret_value(),
                )
            except webhooks.WebhookRejected as exc:
                raise self._reject(exc) from exc
            body = await self._read_limited(request)
            try:
                webhooks.parse_postmark(body)
            except webhooks.WebhookRejected as exc:
                raise self._reject(exc) from exc
            return await self._publish_webhook("postmark", request, body)

        @app.post("/webhooks/ses", tags=["webhooks"])
        async def ses(request: Request) -> JSONResponse:
            """Amazon SES notifications through SNS: signature verified against the SNS
            certificate, topic on the allow-list, subscriptions confirmed."""
            if not settings.ses_topics():
                raise HTTPException(404, "ses webhooks are not configured")
            body = await self._read_limited(request)
            try:
                envelope = json.loads(body)
                if not isinstance(envelope, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                raise HTTPException(400, f"not an SNS message: {exc}") from exc
            try:
                await self.sns.verify(envelope)
            except webhooks.WebhookRejected as exc:
                raise self._reject(exc) from exc
            kind = envelope.get("Type")
            if kind == "SubscriptionConfirmation":
                url = str(envelope.get("SubscribeURL", ""))
                host = urlparse(url).hostname or ""
                if not _SNS_HOST.match(host) or not url.startswith("https://"):
                    raise HTTPException(400, "SubscribeURL is not an SNS URL")
                await self.confirm_subscription(url)
                return JSONResponse({"confirmed": True})
            if kind == "UnsubscribeConfirmation":
                return JSONResponse({"accepted": True})
            if kind != "Notification":
                raise HTTPException(400, f"unknown SNS message type {kind!r}")
            return JSONResponse(await self._publish_webhook("ses", request, body))

        analytics.install(app, self)

    def _verify_mailgun(self, key: str, signature: dict[str, str]) -> None:
        webhooks.verify_mailgun(
            key,
            signature.get("timestamp", ""),
            signature.get("token", ""),
            signature.get("signature", ""),
            now=time.time(),
            tolerance=self.settings.webhook_tolerance_seconds,
        )

    async def _publish_mailgun(
        self, provider: str, request: Request, body: bytes, signature: dict[str, str]
    ) -> dict[str, Any]:
        """Use the (verified) token once, then publish. If publishing fails the token is
        released: Mailgun retries a failed request with the same token, and that retry
        must be accepted, not refused as a replay."""
        token = webhooks.mailgun_token_key(signature.get("token", ""))
        if await repo.seen_token(self.pool, "mailgun", token):
            raise HTTPException(403, "replayed webhook token")
        try:
            return await self._publish_webhook(provider, request, body)
        except BaseException:
            await asyncio.shield(repo.forget_token(self.pool, "mailgun", token))
            raise


def _client_ip(request: Request) -> str | None:
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded:
        return forwarded.split(",")[0].strip()
    return request.client.host if request.client else None
