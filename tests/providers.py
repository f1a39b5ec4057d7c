"""Local stand-ins for the email APIs, following each provider's documented contract.

``provider_server("sendgrid" | "mailgun" | "postmark")`` runs a Starlette app with
uvicorn on 127.0.0.1 (a free port) and gives a ``ContractServer``:

* it checks the credentials the way the provider does (401 and the provider's error
  body otherwise), validates the request shape strictly (a request the real API
  would refuse is refused, with the provider's error shape), and answers with the
  documented success body and headers;
* ``server.received`` lists the accepted messages, parsed (``ReceivedMessage``);
  ``server.rejections`` the contract violations it answered with 4xx;
* ``server.fail_next(status, ...)`` scripts the answers to the next requests
  (429 with ``retry_after``, 5xx, 400/422 with ``message``/``error_code``...);
  ``server.stall_next(seconds)`` delays the next answer (timeouts);
* ``server.transport()`` is the production transport pointed at it.

Contract points (from the providers' documentation):

* SendGrid v3 Mail Send: ``POST /v3/mail/send``, ``Authorization: Bearer <key>``,
  JSON with ``personalizations`` (1..1000, each with a non-empty ``to``), ``from``
  (email required), ``subject`` (here or in every personalization, min length 1),
  ``content`` (type/value, min length 1; "If present, text/plain must be first,
  followed by text/html, followed by any other content"), ``headers`` (may not
  override x-sg-id, x-sg-eid, received, dkim-signature, Content-Type,
  Content-Transfer-Encoding, To, From, Subject, Reply-To, CC, BCC). ``202`` with an
  empty body and ``X-Message-Id``; errors ``{"errors": [{"message", "field"}]}``;
  429 carries ``X-RateLimit-Limit/Remaining/Reset``.
* Mailgun: ``POST /v3/{domain}/messages.mime``, HTTP Basic ``api``:key,
  multipart/form-data with ``to`` (required) and ``message`` (required, sent as a
  file upload); ``o:``/``h:``/``v:``/``t:`` options limited to 16 kB. ``200
  {"id": "<...>", "message": "Queued. Thank you."}``; errors ``{"message": ...}``;
  a wrong key gets ``401`` with the body ``Forbidden``.
* Postmark: ``POST /email`` with ``X-Postmark-Server-Token``, ``Accept`` and
  ``Content-Type: application/json``; ``From`` and ``To`` required, ``TextBody`` or
  ``HtmlBody`` required, ``Headers`` as Name/Value objects, ``Metadata``,
  ``MessageStream``, ``TrackLinks`` in None/HtmlAndText/HtmlOnly/TextOnly. ``200
  {"To", "SubmittedAt", "MessageID", "ErrorCode": 0, "Message": "OK"}``; a wrong
  token is ``401`` with ErrorCode 10; rejections are ``422 {"ErrorCode", "Message"}``
  (300 invalid email request, 406 inactive recipient, ...).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
import secrets
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from email.utils import getaddresses, parseaddr
from typing import Any, Literal
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from services.sender.providers import MailgunTransport, PostmarkTransport, SendGridTransport

Provider = Literal["sendgrid", "mailgun", "postmark"]
PROVIDERS: tuple[Provider, ...] = ("sendgrid", "mailgun", "postmark")

#: The headers a JSON provider must carry over from our message.
CARRIED_HEADERS = (
    "Message-ID",
    "In-Reply-To",
    "References",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)

SENDGRID_RESERVED_HEADERS = frozenset(
    {
        "x-sg-id",
        "x-sg-eid",
        "received",
        "dkim-signature",
        "content-type",
        "content-transfer-encoding",
        "to",
        "from",
        "subject",
        "reply-to",
        "cc",
        "bcc",
    }
)
SENDGRID_CONTENT_ORDER = (
    "If present, text/plain must be first, followed by text/html, followed by any other content."
)
MAILGUN_OPTIONS_LIMIT = 16 * 1024
POSTMARK_TRACK_LINKS = frozenset({"None", "HtmlAndText", "HtmlOnly", "TextOnly"})

#: Postmark's documented API error codes (developer/api/overview#error-codes).
POSTMARK_ERROR_MESSAGES = {
    10: "Bad or missing API token",
    300: "Invalid email request",
    400: "Sender Signature not found",
    401: "Sender signature not confirmed",
    402: "Invalid JSON",
    403: "Incompatible JSON",
    405: "Not allowed to send",
    406: (
        "You tried to send to recipient(s) that have been marked as inactive. Found inactive"
        " addresses: {to}. Inactive recipients are ones that have generated a hard bounce,"
        " a spam complaint, or a manual suppression."
    ),
    409: "JSON required",
    412: "Account is Pending",
    413: "Account May Not Send",
    429: "Rate Limit Exceeded",
}


class ContractViolation(Exception):
    """The request breaks the provider's documented contract: ``status`` is the HTTP
    status (SendGrid, Mailgun), ``error_code`` Postmark's ErrorCode (sent with 422)."""

    def __init__(
        self,
        message: str,
        field: str | None = None,
        status: int = 400,
        error_code: int = 300,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status
        self.error_code = error_code


@dataclass
class ReceivedMessage:
    """One message the contract server accepted, parsed into common terms."""

    provider: str
    provider_message_id: str
    #: The credential as the server saw it: the bearer key, the Basic password, the token.
    credential: str
    from_email: str
    from_name: str | None
    to_email: str
    to_name: str | None
    subject: str
    text: str | None
    html: str | None
    headers: dict[str, str]
    #: delivery_key and friends: SendGrid custom_args, Mailgun v: variables, Postmark Metadata.
    metadata: dict[str, str]
    #: The request as sent: the JSON body, or the Mailgun form fields.
    body: dict[str, Any]
    #: Mailgun only: the ``message`` file part, byte for byte.
    raw: bytes | None = None
    #: Mailgun only: the envelope recipient(s) from ``to``.
    envelope_to: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Scripted:
    status: int | None  # None: answer normally (after ``delay``)
    retry_after: float | None = None
    error_code: int | None = None
    message: str | None = None
    delay: float = 0.0
    #: SendGrid: the error's ``field`` (e.g. "personalizations.0.to.0.email").
    field: str | None = None


# ----------------------------------------------------------------- multipart parsing


@dataclass(frozen=True)
class FormPart:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def _header_params(value: str, header: str = "content-type") -> Message:
    holder = Message()
    holder[header] = value
    return holder


def parse_multipart(body: bytes, content_type: str) -> list[FormPart]:
    """A strict multipart/form-data parser (RFC 7578), keeping each part byte for byte."""
    holder = _header_params(content_type)
    if holder.get_content_type() != "multipart/form-data":
        raise ContractViolation(f"expected multipart/form-data, got {content_type!r}")
    boundary = holder.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise ContractViolation("multipart/form-data without a boundary")
    delimiter = b"--" + boundary.encode("ascii")
    sections = body.split(delimiter)
    if len(sections) < 3 or sections[0] not in (b"", b"\r\n"):
        raise ContractViolation("malformed multipart body")
    if not sections[-1].startswith(b"--"):
        raise ContractViolation("multipart body without its closing delimiter")
    parts = []
    for section in sections[1:-1]:
        if not section.startswith(b"\r\n") or not section.endswith(b"\r\n"):
            raise ContractViolation("malformed multipart part")
        head, separator, data = section[2:-2].partition(b"\r\n\r\n")
        if not separator:
            raise ContractViolation("multipart part without a header block")
        headers = email.message_from_bytes(head + b"\r\n\r\n", policy=email.policy.HTTP)
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise ContractViolation("multipart part without Content-Disposition")
        params = _header_params(str(disposition), "content-disposition")
        if params.get_content_disposition() != "form-data":
            raise ContractViolation(f"unexpected Content-Disposition {disposition!r}")
        name = params.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise ContractViolation("multipart part without a name")
        filename = params.get_param("filename", header="content-disposition")
        part_type = headers.get("content-type")
        parts.append(
            FormPart(
                name,
                filename if isinstance(filename, str) else None,
                str(part_type) if part_type is not None else None,
                data,
            )
        )
    return parts


# ----------------------------------------------------------------- helpers


def _bodies(message: Message) -> tuple[str | None, str | None]:
    text = html = None
    for part in message.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes):
            continue
        decoded = payload.decode(part.get_content_charset() or "utf-8").replace("\r\n", "\n")
        if part.get_content_type() == "text/plain" and text is None:
            text = decoded
        elif part.get_content_type() == "text/html" and html is None:
            html = decoded
    return text, html


def _address(value: str, what: str) -> tuple[str | None, str]:
    name, address = parseaddr(value)
    if "@" not in address or " " in address:
        raise ContractViolation(
            f"Error parsing '{what}': Illegal email address '{value}'.", status=422
        )
    return (name or None), address


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ContractViolation(f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ContractViolation("the body must be a JSON object")
    return data


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"


# ----------------------------------------------------------------- the server


class ContractServer:
    """One provider's API on a local port; see the module docstring."""

    def __init__(self, provider: Provider) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}")
        self.provider: Provider = provider
        self.api_key = (
            f"SG.{secrets.token_urlsafe(16)}.{secrets.token_urlsafe(24)}"
            if provider == "sendgrid"
            else str(uuid.uuid4())
            if provider == "postmark"
            else f"key-{secrets.token_hex(16)}"
        )
        self.domain = "mg.example.test"
        self.received: list[ReceivedMessage] = []
        #: The last well-formed request, accepted or answered with a scripted failure.
        self.last_request: ReceivedMessage | None = None
        self.rejections: list[tuple[int, str]] = []
        self.requests = 0
        self._script: deque[Scripted] = deque()
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        routes = {
            "sendgrid": [Route("/v3/mail/send", self._sendgrid, methods=["POST"])],
            "mailgun": [Route("/v3/{domain}/messages.mime", self._mailgun, methods=["POST"])],
            "postmark": [Route("/email", self._postmark, methods=["POST"])],
        }[provider]
        self.app = Starlette(routes=routes)

    # ------------------------------------------------------------- public API

    @property
    def token(self) -> str:
        """Postmark's name for the credential."""
        return self.api_key

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def fail_next(
        self,
        status: int,
        *,
        times: int = 1,
        retry_after: float | None = None,
        error_code: int | None = None,
        message: str | None = None,
        field: str | None = None,
    ) -> None:
        """Answer the next ``times`` valid requests with ``status`` and the provider's
        error body (``error_code``: Postmark's ErrorCode; ``message``: the error text;
        ``field``: the field SendGrid names)."""
        for _ in range(times):
            self._script.append(Scripted(status, retry_after, error_code, message, field=field))

    def stall_next(self, seconds: float, *, times: int = 1) -> None:
        """Wait ``seconds`` before answering the next ``times`` requests normally."""
        for _ in range(times):
            self._script.append(Scripted(None, delay=seconds))

    def transport(
        self, **overrides: Any
    ) -> SendGridTransport | MailgunTransport | PostmarkTransport:
        """The production transport for this provider, pointed at this server."""
        options: dict[str, Any] = {"base_url": self.base_url, "timeout": 5.0, **overrides}
        api_key = options.pop("api_key", self.api_key)
        if self.provider == "sendgrid":
            return SendGridTransport(api_key, **options)
        if self.provider == "mailgun":
            return MailgunTransport(api_key, options.pop("domain", self.domain), **options)
        return PostmarkTransport(api_key, **options)

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = int(sock.getsockname()[1])
        self._socket = sock
        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._server = _QuietServer(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        for _ in range(200):
            if self._server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if not self._server.started:
            await self.stop()
            raise RuntimeError(f"the {self.provider} contract server did not start")

    async def stop(self) -> None:
        server, task, sock = self._server, self._task, self._socket
        self._server = self._task = self._socket = None
        if server is not None:
            server.should_exit = True
        if task is not None:
            try:
                await asyncio.wait_for(task, 5)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if sock is not None:
            sock.close()

    # ------------------------------------------------------------- plumbing

    async def _answer(
        self,
        request: Request,
        authorized: Callable[[Request], str | None],
        unauthorized: Callable[[], Response],
        accept: Callable[[Request, str], Awaitable[Response]],
        error: Callable[[Scripted | ContractViolation], Response],
    ) -> Response:
        self.requests += 1
        scripted = self._script.popleft() if self._script else None
        if scripted is not None and scripted.delay:
            await asyncio.sleep(scripted.delay)
        credential = authorized(request)
        if credential is None:
            return unauthorized()
        try:
            response = await accept(request, credential)
        except ContractViolation as exc:
            if scripted is not None and scripted.status is not None:
                self._script.appendleft(scripted)  # kept for the next well-formed request
            self.rejections.append((exc.status, exc.message))
            return error(exc)
        if scripted is not None and scripted.status is not None:
            self.received.pop()  # a scripted failure: the request was valid, not accepted
            return error(scripted)
        return response

    def _record(self, message: ReceivedMessage) -> None:
        self.last_request = message
        self.received.append(message)

    def _retry_headers(self, scripted: Scripted) -> dict[str, str]:
        if scripted.retry_after is None:
            return {}
        return {"Retry-After": f"{scripted.retry_after:g}"}

    # ------------------------------------------------------------- SendGrid

    def _sendgrid_credential(self, request: Request) -> str | None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return key if scheme == "Bearer" and key == self.api_key else None

    @staticmethod
    def _sendgrid_errors(status: int, message: str, field: str | None = None) -> JSONResponse:
        return JSONResponse(
            {"errors": [{"message": message, "field": field, "help": None}]}, status
        )

    def _sendgrid_error(self, failure: Scripted | ContractViolation) -> Response:
        if isinstance(failure, ContractViolation):
            return self._sendgrid_errors(failure.status, failure.message, failure.field)
        status = failure.status or 500
        default = {
            400: "invalid request",
            401: "authorization required",
            403: "access forbidden",
            413: "content too large",
            429: "too many requests",
        }.get(status, "internal server error")
        response = self._sendgrid_errors(status, failure.message or default, failure.field)
        if status == 429:
            reset = int(time.time() + (failure.retry_after or 1))
            response.headers.update(
                {
                    "X-RateLimit-Limit": "600",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset": str(reset),
                }
            )
        response.headers.update(self._retry_headers(failure))
        return response

    async def _sendgrid(self, request: Request) -> Response:
        return await self._answer(
            request,
            self._sendgrid_credential,
            lambda: self._sendgrid_errors(401, "authorization required"),
            self._sendgrid_accept,
            self._sendgrid_error,
        )

    async def _sendgrid_accept(self, request: Request, credential: str) -> Response:
        if not _is_json(request):
            raise ContractViolation("Content-Type should be application/json.", status=415)
        data = _json_object(await request.body())
        personalizations = data.get("personalizations")
        if not isinstance(personalizations, list) or not personalizations:
            raise ContractViolation(
                "You must have at least one personalization.", "personalizations"
            )
        if len(personalizations) > 1000:
            raise ContractViolation(
                "The personalization block is limited to 1000 personalizations per API request.",
                "personalizations",
            )
        subject = data.get("subject")
        for index, personalization in enumerate(personalizations):
            where = f"personalizations.{index}"
            if not isinstance(personalization, dict):
                raise ContractViolation("personalizations must be objects", where)
            to = personalization.get("to")
            if not isinstance(to, list) or not to:
                raise ContractViolation(
                    "The to parameter is required for all personalization objects.",
                    f"{where}.to",
                )
            for recipient in to:
                self._sendgrid_email(recipient, f"{where}.to")
            own_subject = personalization.get("subject", subject)
            if not isinstance(own_subject, str) or not own_subject:
                raise ContractViolation(
                    "The subject is required. You can get around this requirement if you use a"
                    " template with a subject defined or if every personalization has a"
                    " subject defined.",
                    "subject",
                )
            self._sendgrid_string_map(personalization.get("headers"), f"{where}.headers")
            self._sendgrid_string_map(personalization.get("custom_args"), f"{where}.custom_args")
        sender = data.get("from")
        if sender is None:
            raise ContractViolation(
                "The from object must be provided for every email send.", "from"
            )
        self._sendgrid_email(sender, "from")
        content = data.get("content")
        if not isinstance(content, list) or not content:
            raise ContractViolation(
                "Unless a valid template_id is provided, the content parameter is required.",
                "content",
            )
        types = []
        for item in content:
            if not isinstance(item, dict):
                raise ContractViolation("content items must be objects", "content")
            kind, value = item.get("type"), item.get("value")
            if not isinstance(kind, str) or not kind:
                raise ContractViolation("The content type cannot be blank.", "content.type")
            if not isinstance(value, str) or not value:
                raise ContractViolation(
                    "The content value must be a string at least one character in length.",
                    "content.value",
                )
            types.append(kind)
        if types.count("text/plain") > 1 or types.count("text/html") > 1:
            raise ContractViolation(
                "If present, text/plain and text/html may only be provided once.", "content"
            )
        expected = [t for t in ("text/plain", "text/html") if t in types]
        if types[: len(expected)] != expected:
            raise ContractViolation(SENDGRID_CONTENT_ORDER, "content")
        headers = self._sendgrid_string_map(data.get("headers"), "headers")
        for name in headers:
            if name.lower() in SENDGRID_RESERVED_HEADERS:
                raise ContractViolation(
                    f"The header {name} is reserved and may not be overridden.", "headers"
                )
        self._sendgrid_string_map(data.get("custom_args"), "custom_args")
        first = personalizations[0]
        recipient = first["to"][0]
        by_type = {item["type"]: item["value"] for item in content}
        message_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        self._record(
            ReceivedMessage(
                provider="sendgrid",
                provider_message_id=message_id,
                credential=credential,
                from_email=sender["email"],
                from_name=sender.get("name"),
                to_email=recipient["email"],
                to_name=recipient.get("name"),
                subject=first.get("subject", subject),
                text=by_type.get("text/plain"),
                html=by_type.get("text/html"),
                headers={**headers, **first.get("headers", {})},
                metadata={**data.get("custom_args", {}), **first.get("custom_args", {})},
                body=data,
            )
        )
        return Response(status_code=202, headers={"X-Message-Id": message_id})

    @staticmethod
    def _sendgrid_email(value: Any, where: str) -> None:
        if not isinstance(value, dict) or not isinstance(value.get("email"), str):
            raise ContractViolation(
                "Each email address must have an email and may also contain a name.", where
            )
        if "@" not in value["email"] or " " in value["email"]:
            raise ContractViolation("Does not contain a valid address.", f"{where}.email")
        if "name" in value and not isinstance(value["name"], str):
            raise ContractViolation("The name must be a string.", f"{where}.name")

    @staticmethod
    def _sendgrid_string_map(value: Any, where: str) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ContractViolation(f"{where} must be an object of string values.", where)
        return value

    # ------------------------------------------------------------- Mailgun

    def _mailgun_credential(self, request: Request) -> str | None:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme != "Basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return password if user == "api" and password == self.api_key else None

    @staticmethod
    def _mailgun_error(failure: Scripted | ContractViolation) -> Response:
        if isinstance(failure, ContractViolation):
            if failure.status == 404:
                return PlainTextResponse("404 page not found", 404)
            return JSONResponse({"message": failure.message}, failure.status)
        status = failure.status or 500
        if status == 401:
            return PlainTextResponse("Forbidden", 401)
        default = {
            400: "'to' parameter is not a valid address. please check documentation",
            403: "Domain mg.example.test is not allowed to send: account disabled",
            429: "Too many requests",
        }.get(status, "Internal Server Error")
        response = JSONResponse({"message": failure.message or default}, status)
        if failure.retry_after is not None:
            response.headers["Retry-After"] = f"{failure.retry_after:g}"
        return response

    async def _mailgun(self, request: Request) -> Response:
        return await self._answer(
            request,
            self._mailgun_credential,
            lambda: PlainTextResponse("Forbidden", 401),
            self._mailgun_accept,
            self._mailgun_error,
        )

    async def _mailgun_accept(self, request: Request, credential: str) -> Response:
        domain = request.path_params["domain"]
        if domain != self.domain:
            raise ContractViolation(f"Domain not found: {domain}", status=404)
        content_type = request.headers.get("content-type", "")
        body = await request.body()
        if content_type.split(";")[0].strip() == "application/x-www-form-urlencoded":
            # Accepted by the API, but then ``message`` cannot be the file it must be.
            parts = [
                FormPart(name, None, None, value.encode())
                for name, value in parse_qsl(body.decode(), keep_blank_values=True)
            ]
        else:
            parts = parse_multipart(body, content_type)
        fields: dict[str, list[str]] = {}
        files: dict[str, FormPart] = {}
        options_size = 0
        for part in parts:
            if part.name.startswith(("o:", "h:", "v:", "t:")):
                options_size += len(part.name) + len(part.data)
            if part.filename is not None:
                files[part.name] = part
            else:
                fields.setdefault(part.name, []).append(part.data.decode("utf-8"))
        if options_size > MAILGUN_OPTIONS_LIMIT:
            raise ContractViolation(
                "Send options (parameters starting with o:, h:, v:, or t:) are limited to 16 kB"
                " total"
            )
        to = [addr for value in fields.get("to", []) for _, addr in getaddresses([value])]
        if not to:
            raise ContractViolation("to parameter is missing")
        for address in to:
            if "@" not in address:
                raise ContractViolation(
                    f"to parameter is not a valid address. please check documentation: {address}"
                )
        if "message" in fields:
            raise ContractViolation("'message' parameter is not a file")
        if "message" not in files:
            raise ContractViolation("message parameter is missing")
        raw = files["message"].data
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        if parsed["From"] is None:
            raise ContractViolation("the MIME message has no From header")
        from_name, from_email = parseaddr(str(parsed["From"]))
        to_name, to_email = parseaddr(str(parsed["To"] or ""))
        text, html = _bodies(parsed)
        provider_id = (
            f"<{datetime.now(UTC):%Y%m%d%H%M%S}.{secrets.token_hex(8).upper()}@{self.domain}>"
        )
        self._record(
            ReceivedMessage(
                provider="mailgun",
                provider_message_id=provider_id,
                credential=credential,
                from_email=from_email,
                from_name=from_name or None,
                to_email=to_email,
                to_name=to_name or None,
                subject=str(parsed["Subject"] or ""),
                text=text,
                html=html,
                headers={
                    name: str(parsed[name]) for name in CARRIED_HEADERS if parsed[name] is not None
                },
                metadata={
                    key[2:]: values[-1] for key, values in fields.items() if key.startswith("v:")
                },
                body={key: values[-1] for key, values in fields.items()},
                raw=raw,
                envelope_to=to,
            )
        )
        return JSONResponse({"id": provider_id, "message": "Queued. Thank you."})

    # ------------------------------------------------------------- Postmark

    def _postmark_credential(self, request: Request) -> str | None:
        token = request.headers.get("x-postmark-server-token")
        return token if token == self.api_key else None

    @staticmethod
    def _postmark_body(error_code: int, message: str, status: int) -> JSONResponse:
        return JSONResponse({"ErrorCode": error_code, "Message": message}, status)

    def _postmark_error(self, failure: Scripted | ContractViolation) -> Response:
        if isinstance(failure, ContractViolation):
            return self._postmark_body(failure.error_code, failure.message, 422)
        status = failure.status or 500
        if status == 401:
            return self._postmark_body(10, POSTMARK_ERROR_MESSAGES[10], 401)
        if status == 429:
            response = self._postmark_body(429, POSTMARK_ERROR_MESSAGES[429], 429)
        elif status == 422:
            code = failure.error_code if failure.error_code is not None else 300
            to = self.last_request.to_email if self.last_request else "unknown"
            text = failure.message or POSTMARK_ERROR_MESSAGES.get(
                code, "Unprocessable Entity"
            ).format(to=to)
            response = self._postmark_body(code, text, 422)
        elif status >= 500:
            response = self._postmark_body(
                failure.error_code or 0, failure.message or "Internal Server Error", status
            )
        else:
            response = self._postmark_body(
                failure.error_code or 0, failure.message or "Request failed", status
            )
        response.headers.update(self._retry_headers(failure))
        return response

    async def _postmark(self, request: Request) -> Response:
        return await self._answer(
            request,
            self._postmark_credential,
            lambda: self._postmark_body(
                10,
                "The Server Token you provided in the X-Postmark-Server-Token request header"
                " was invalid. Please verify that you are using a valid token.",
                401,
            ),
            self._postmark_accept,
            self._postmark_error,
        )

    async def _postmark_accept(self, request: Request, credential: str) -> Response:
        if not _is_json(request):
            raise ContractViolation(POSTMARK_ERROR_MESSAGES[409], status=422, error_code=409)
        if "application/json" not in request.headers.get("accept", ""):
            raise ContractViolation(
                "The Accept header must be application/json.", status=422, error_code=409
            )
        try:
            data = _json_object(await request.body())
        except ContractViolation as exc:
            raise ContractViolation(
                f"{POSTMARK_ERROR_MESSAGES[402]}: {exc.message}", status=422, error_code=402
            ) from exc
        for required in ("From", "To"):
            if not isinstance(data.get(required), str) or not data[required].strip():
                raise ContractViolation(
                    f"Invalid '{required}' address: no address given.", status=422
                )
        from_name, from_email = _address(data["From"], "From")
        recipients = getaddresses([data["To"]])
        if len(recipients) > 50:
            raise ContractViolation(
                "Maximum of 50 recipients allowed per email message.", status=422
            )
        for name, address in recipients:
            _address(f"{name} <{address}>" if name else address, "To")
        to_name, to_email = recipients[0][0] or None, recipients[0][1]
        text, html = data.get("TextBody"), data.get("HtmlBody")
        if not (isinstance(text, str) and text) and not (isinstance(html, str) and html):
            raise ContractViolation(
                "Provide either email TextBody or HtmlBody or both.", status=422
            )
        for key in ("Subject", "TextBody", "HtmlBody", "MessageStream", "Tag", "ReplyTo"):
            if key in data and not isinstance(data[key], str):
                raise ContractViolation(f"{key} must be a string.", status=422, error_code=403)
        headers: dict[str, str] = {}
        raw_headers = data.get("Headers", [])
        if not isinstance(raw_headers, list):
            raise ContractViolation(
                "Headers must be a list of Name/Value objects.", status=422, error_code=403
            )
        for header in raw_headers:
            if (
                not isinstance(header, dict)
                or set(header) != {"Name", "Value"}
                or not isinstance(header["Name"], str)
                or not isinstance(header["Value"], str)
                or not header["Name"]
            ):
                raise ContractViolation(
                    "Headers must be a list of Name/Value objects.", status=422, error_code=403
                )
            headers[header["Name"]] = header["Value"]
        metadata = data.get("Metadata", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise ContractViolation(
                "Metadata must be an object of string values.", status=422, error_code=403
            )
        if "TrackOpens" in data and not isinstance(data["TrackOpens"], bool):
            raise ContractViolation("TrackOpens must be a boolean.", status=422, error_code=403)
        if "TrackLinks" in data and data["TrackLinks"] not in POSTMARK_TRACK_LINKS:
            raise ContractViolation(
                "TrackLinks must be one of None, HtmlAndText, HtmlOnly, TextOnly.",
                status=422,
                error_code=403,
            )
        message_id = str(uuid.uuid4())
        self._record(
            ReceivedMessage(
                provider="postmark",
                provider_message_id=message_id,
                credential=credential,
                from_email=from_email,
                from_name=from_name,
                to_email=to_email,
                to_name=to_name,
                subject=data.get("Subject", ""),
                text=text,
                html=html,
                headers=headers,
                metadata=metadata,
                body=data,
            )
        )
        return JSONResponse(
            {
                "To": data["To"],
                "SubmittedAt": datetime.now(UTC).isoformat(),
                "MessageID": message_id,
                "ErrorCode": 0,
                "Message": "OK",
            }
        )


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The test runner owns signal handling.
        yield


@contextlib.asynccontextmanager
async def provider_server(provider: Provider) -> AsyncIterator[ContractServer]:
    """``async with provider_server("sendgrid") as server:`` a running contract server,
    stopped on exit."""
    server = ContractServer(provider)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
