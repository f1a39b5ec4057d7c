"""Handing messages to email APIs over HTTP: SendGrid, Mailgun, Postmark.

Each transport holds one pooled ``httpx.AsyncClient``; production base URLs are the
defaults and ``base_url=`` points a transport elsewhere (a regional endpoint, the
contract servers in ``tests/providers.py``).

What each provider is sent
--------------------------
* **SendGrid** (v3 Mail Send, ``POST /v3/mail/send``, ``Authorization: Bearer``):
  JSON built from the message's parts; ``content`` is text/plain first, then
  text/html (the API rejects any other order); ``headers`` carries Message-ID,
  In-Reply-To, References and the List-Unsubscribe pair (none of them is on the
  documented list of headers that may not be overridden: x-sg-id, x-sg-eid,
  received, dkim-signature, Content-Type, Content-Transfer-Encoding, To, From,
  Subject, Reply-To, CC, BCC); ``custom_args.delivery_key`` on the personalization.
  Success is ``202`` with the id in the ``X-Message-Id`` response header.
* **Mailgun** (``POST /v3/{domain}/messages.mime``, HTTP Basic ``api``:key): our own
  RFC 5322 bytes as the ``message`` file part, so our MIME, Message-ID and DKIM
  signature travel unchanged; ``to`` is the envelope recipient, ``v:delivery_key``
  a user variable. Success is ``200 {"id": "<...>", "message": "Queued. Thank you."}``.
* **Postmark** (``POST /email``, ``X-Postmark-Server-Token``): JSON with From/To as
  ``"Name" <address>``, Subject, TextBody, HtmlBody, Headers as Name/Value pairs,
  MessageStream and ``Metadata.delivery_key``. Success is ``200`` with
  ``ErrorCode 0`` and ``MessageID``.

The message already carries touchstream's own open/click tracking and unsubscribe
link, so the provider's tracking is switched off per message (SendGrid
``tracking_settings``, Mailgun ``o:tracking=no``, Postmark ``TrackOpens``/
``TrackLinks``): provider link rewriting would wrap our links twice and, for
Mailgun, break our DKIM body hash.

How answers map to errors
-------------------------
* network errors and timeouts -> ``ProviderTransientError`` (``code`` None);
* HTTP 408, 429 and 5xx -> ``ProviderTransientError`` with the status as ``code``
  and ``retry_after`` (seconds) from ``Retry-After`` (delta or HTTP date) or, failing
  that, SendGrid's ``X-RateLimit-Reset`` epoch;
* HTTP 401/403 (bad key, unverified sender, account state) and other statuses that
  say nothing about this message (402, 404, 405, 415, ...) -> ``ProviderTransientError``:
  not this message's fault, the dispatcher fails over to another transport;
* HTTP 400/413/422 rejections of this message -> ``ProviderPermanentError`` with the
  provider's error text (SendGrid's ``errors`` messages joined) and the status,
  classified ``hard`` (suppresses the address) only when the provider blames the
  recipient's address (SendGrid: an error on ``personalizations[].to[].email``;
  Mailgun: "'to' parameter is not a valid address"), otherwise ``policy``;
* Postmark's 422 is refined by its ``ErrorCode``: 406 (inactive recipient: hard
  bounce, spam complaint or manual suppression) -> permanent, hard; 300 (invalid
  email request) -> permanent, hard only when the message blames the ``To``
  address, and transient when it blames ``From`` (an unverified sender signature
  is configuration, not this message); 10, 400, 401, 405, 412, 413 (token, sender
  signature, credits, account) -> transient.

``send`` awaits its ``gate`` right before the request: the request is the hand-off.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx

from services.sender.domain import classify_provider_rejection
from services.sender.mime import BuiltMessage
from services.sender.transport import (
    Accepted,
    HandOffGate,
    HandOffRefused,
    HandOffUncertain,
    PermanentSendError,
    TransientSendError,
)

log = logging.getLogger(__name__)

USER_AGENT = "touchstream"

#: Longest error text kept from a provider's answer.
_MAX_ERROR_TEXT = 500


class ProviderTransientError(TransientSendError):
    """Try again later or through another transport; ``retry_after`` is what the
    provider asked for, in seconds, when it said."""

    def __init__(
        self,
        message: str,
        code: int | None = None,
        *,
        provider: str,
        retry_after: float | None = None,
        provider_code: int | None = None,
    ) -> None:
        super().__init__(message, code)
        self.provider = provider
        self.retry_after = retry_after
        self.provider_code = provider_code


class ProviderPermanentError(PermanentSendError):
    """The provider refused this message for good; ``blames_recipient`` says the
    address itself is the problem (inactive or invalid): a hard rejection, and
    ``suppress`` then says it belongs on the suppression list."""

    def __init__(
        self,
        message: str,
        code: int | None = None,
        *,
        provider: str,
        blames_recipient: bool = False,
        provider_code: int | None = None,
    ) -> None:
        super().__init__(
            message, code, rejection=classify_provider_rejection(blames_recipient=blames_recipient)
        )
        self.provider = provider
        self.provider_code = provider_code


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta seconds or an HTTP date."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def _retry_after(response: httpx.Response) -> float | None:
    seconds = parse_retry_after(response.headers.get("retry-after"))
    if seconds is not None:
        return seconds
    reset = response.headers.get("x-ratelimit-reset")  # SendGrid: a Unix time
    if reset is not None:
        try:
            return max(float(reset) - time.time(), 0.0)
        except ValueError:
            return None
    return None


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 1] + "…"


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _quoted_name(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mailbox(name: str | None, address: str) -> str:
    """``"Name" <address>``, the name always quoted (punctuation escaped)."""
    return f"{_quoted_name(name)} <{address}>" if name else address


def classify_http_error(
    provider: str,
    status: int,
    text: str,
    *,
    retry_after: float | None = None,
    provider_code: int | None = None,
    blames_recipient: bool = False,
) -> TransientSendError | PermanentSendError:
    """The error for a non-success HTTP answer (see the module docstring)."""
    message = f"{provider}: HTTP {status}: {_short(text) or 'no details'}"
    if status in (400, 413, 422):
        return ProviderPermanentError(
            message,
            status,
            provider=provider,
            provider_code=provider_code,
            blames_recipient=blames_recipient,
        )
    return ProviderTransientError(
        message,
        status,
        provider=provider,
        retry_after=retry_after if status == 429 or status >= 500 else None,
        provider_code=provider_code,
    )


class _HttpTransport(ABC):
    """Shared plumbing: one pooled client, network errors as transient failures."""

    provider: ClassVar[str]

    def __init__(
        self,
        *,
        base_url: str,
        timeout: float,
        name: str,
        headers: dict[str, str] | None = None,
        auth: httpx.Auth | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=timeout,
            headers={"User-Agent": USER_AGENT, **(headers or {})},
            auth=auth,
        )

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.post(path, **kwargs)
        except (httpx.ReadTimeout, httpx.ReadError, httpx.RemoteProtocolError) as exc:
            # The request went out; its answer did not come back: the provider may
            # have accepted it, and another try (or transport) could send it twice.
            raise HandOffUncertain(f"{self.provider}: no answer to the request: {exc!r}") from exc
        except httpx.TimeoutException as exc:
            raise ProviderTransientError(
                f"{self.provider}: timed out: {exc!r}", provider=self.provider
            ) from exc
        except httpx.HTTPError as exc:
            raise ProviderTransientError(
                f"{self.provider}: unavailable: {exc!r}", provider=self.provider
            ) from exc

    def _error(
        self, response: httpx.Response, text: str, *, blames_recipient: bool = False
    ) -> TransientSendError | PermanentSendError:
        return classify_http_error(
            self.provider,
            response.status_code,
            text,
            retry_after=_retry_after(response),
            blames_recipient=blames_recipient,
        )

    async def send(
        self,
        message: BuiltMessage,
        gate: HandOffGate | None = None,
        ahead: BuiltMessage | None = None,
    ) -> Accepted:
        """One request per message: ``ahead`` has nothing to pipeline with."""
        return await self._send(message, gate)

    @abstractmethod
    async def _send(self, message: BuiltMessage, gate: HandOffGate | None) -> Accepted:
        """The provider's own request: through ``gate`` first, then the message."""

    async def _through_gate(self, gate: HandOffGate | None) -> None:
        if gate is not None and not await gate():
            raise HandOffRefused(f"{self.name}: the hand-off was called off")

    async def close(self) -> None:
        await self._client.aclose()


class SendGridTransport(_HttpTransport):
    """SendGrid v3 Mail Send."""

    provider = "sendgrid"

    #: Headers SendGrid does not let a sender override (compared case-insensitively).
    RESERVED_HEADERS = frozenset(
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

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = "https://api.sendgrid.com",
        timeout: float = 30.0,
        name: str = "sendgrid",
    ) -> None:
        super().__init__(
            base_url=base_url,
            timeout=timeout,
            name=name,
            headers={"Authorization": f"Bearer {api_key}"},
        )

    def payload(self, message: BuiltMessage) -> dict[str, Any]:
        to: dict[str, str] = {"email": message.to_email}
        if message.to_name:
            to["name"] = message.to_name
        sender: dict[str, str] = {"email": message.from_email}
        if message.from_name:
            sender["name"] = message.from_name
        personalization: dict[str, Any] = {"to": [to]}
        if message.delivery_key:
            personalization["custom_args"] = {"delivery_key": message.delivery_key}
        content = []
        if message.text:
            content.append({"type": "text/plain", "value": message.text})
        if message.html:
            content.append({"type": "text/html", "value": message.html})
        body: dict[str, Any] = {
            "personalizations": [personalization],
            "from": sender,
            "subject": message.subject,
            "content": content,
            "tracking_settings": {
                "click_tracking": {"enable": False, "enable_text": False},
                "open_tracking": {"enable": False},
                "subscription_tracking": {"enable": False},
            },
        }
        headers = {
            key: value
            for key, value in message.headers.items()
            if key.lower() not in self.RESERVED_HEADERS
        }
        if headers:
            body["headers"] = headers
        return body

    #: The error field of a recipient's address in a v3 Mail Send error.
    RECIPIENT_FIELD = re.compile(r"^personalizations\.\d+\.to(\.\d+)?(\.email)?$")

    async def _send(self, message: BuiltMessage, gate: HandOffGate | None) -> Accepted:
        payload = self.payload(message)
        await self._through_gate(gate)
        response = await self._post("/v3/mail/send", json=payload)
        if response.is_success:
            return Accepted(
                response.status_code,
                f"{response.status_code} {response.reason_phrase}".strip(),
                response.headers.get("x-message-id"),
            )
        text, blames_recipient = self._error_text(response)
        raise self._error(response, text, blames_recipient=blames_recipient)

    @classmethod
    def _error_text(cls, response: httpx.Response) -> tuple[str, bool]:
        """The errors' text, and whether one of them is about the recipient's address."""
        data = _json(response)
        errors = data.get("errors") if isinstance(data, dict) else None
        if isinstance(errors, list) and errors:
            parts = []
            blames_recipient = False
            for error in errors:
                if not isinstance(error, dict):
                    continue
                text = str(error.get("message") or "").strip()
                field = error.get("field")
                if field and field != "null":
                    blames_recipient |= bool(cls.RECIPIENT_FIELD.match(str(field)))
                    text = f"{field}: {text}"
                if text:
                    parts.append(text)
            if parts:
                return "; ".join(parts), blames_recipient
        return response.text, False


class MailgunTransport(_HttpTransport):
    """Mailgun, sending our own MIME (``messages.mime``)."""

    provider = "mailgun"

    def __init__(
        self,
        api_key: str,
        domain: str,
        *,
        base_url: str = "https://api.mailgun.net",
        timeout: float = 30.0,
        name: str = "mailgun",
    ) -> None:
        super().__init__(
            base_url=base_url,
            timeout=timeout,
            name=name,
            headers={"Accept": "application/json"},
            auth=httpx.BasicAuth("api", api_key),
        )
        self.domain = domain

    #: Mailgun's answer when the ``to`` parameter is not an address it accepts.
    INVALID_TO = re.compile(r"^'?to'? parameter is not a valid address", re.IGNORECASE)

    async def _send(self, message: BuiltMessage, gate: HandOffGate | None) -> Accepted:
        fields = {"to": message.to_email, "o:tracking": "no"}
        if message.delivery_key:
            fields["v:delivery_key"] = message.delivery_key
        await self._through_gate(gate)
        response = await self._post(
            f"/v3/{self.domain}/messages.mime",
            data=fields,
            files={"message": ("message.eml", message.data, "message/rfc822")},
        )
        data = _json(response)
        if response.is_success:
            if not isinstance(data, dict):
                # Queued all the same: failing here would send the message twice.
                log.warning("mailgun: HTTP %s with an unreadable body", response.status_code)
                return Accepted(response.status_code, _short(response.text), None)
            provider_id = data.get("id")
            return Accepted(
                response.status_code,
                str(data.get("message") or response.reason_phrase),
                str(provider_id) if provider_id else None,
            )
        text = data.get("message") if isinstance(data, dict) else None
        raise self._error(
            response,
            str(text) if text else response.text,
            blames_recipient=bool(text and self.INVALID_TO.match(str(text).strip())),
        )


class PostmarkTransport(_HttpTransport):
    """Postmark single-message send (``/email``)."""

    provider = "postmark"

    #: ErrorCodes about the token, the sender signature or the account: configuration,
    #: not this message (10 bad token, 400/401 sender signature not found/confirmed,
    #: 405 not allowed to send, 412 account pending, 413 account may not send).
    ACCOUNT_ERROR_CODES = frozenset({10, 400, 401, 405, 412, 413})
    INACTIVE_RECIPIENT = 406
    INVALID_EMAIL_REQUEST = 300
    RATE_LIMIT_EXCEEDED = 429

    def __init__(
        self,
        server_token: str,
        *,
        base_url: str = "https://api.postmarkapp.com",
        timeout: float = 30.0,
        name: str = "postmark",
        message_stream: str = "outbound",
    ) -> None:
        super().__init__(
            base_url=base_url,
            timeout=timeout,
            name=name,
            headers={
                "X-Postmark-Server-Token": server_token,
                "Accept": "application/json",
            },
        )
        self.message_stream = message_stream

    def payload(self, message: BuiltMessage) -> dict[str, Any]:
        body: dict[str, Any] = {
            "From": _mailbox(message.from_name, message.from_email),
            "To": _mailbox(message.to_name, message.to_email),
            "Subject": message.subject,
            "Headers": [{"Name": key, "Value": value} for key, value in message.headers.items()],
            "TrackOpens": False,
            "TrackLinks": "None",
            "MessageStream": self.message_stream,
        }
        if message.text:
            body["TextBody"] = message.text
        if message.html:
            body["HtmlBody"] = message.html
        if message.delivery_key:
            body["Metadata"] = {"delivery_key": message.delivery_key}
        return body

    async def _send(self, message: BuiltMessage, gate: HandOffGate | None) -> Accepted:
        payload = self.payload(message)
        await self._through_gate(gate)
        # json= sets Content-Type: application/json.
        response = await self._post("/email", json=payload)
        data = _json(response)
        error_code = data.get("ErrorCode") if isinstance(data, dict) else None
        text = str(data.get("Message") or "") if isinstance(data, dict) else response.text
        if response.is_success and not isinstance(data, dict):
            # Accepted all the same: failing here would send the message twice.
            log.warning("postmark: HTTP %s with an unreadable body", response.status_code)
            return Accepted(response.status_code, _short(response.text), None)
        if response.is_success and error_code == 0 and isinstance(data, dict):
            provider_id = data.get("MessageID")
            return Accepted(
                response.status_code, text or "OK", str(provider_id) if provider_id else None
            )
        if isinstance(error_code, int) and (response.status_code == 422 or response.is_success):
            raise self._api_error(response, error_code, text)
        raise classify_http_error(
            self.provider,
            response.status_code,
            text or response.text,
            retry_after=_retry_after(response),
            provider_code=error_code if isinstance(error_code, int) else None,
        )

    def _api_error(
        self, response: httpx.Response, error_code: int, text: str
    ) -> TransientSendError | PermanentSendError:
        status = response.status_code
        message = f"postmark: HTTP {status}, ErrorCode {error_code}: {_short(text)}"
        if error_code == self.INACTIVE_RECIPIENT:
            return ProviderPermanentError(
                message,
                status,
                provider=self.provider,
                blames_recipient=True,
                provider_code=error_code,
            )
        if error_code == self.INVALID_EMAIL_REQUEST:
            if "'from'" in text.lower():
                return ProviderTransientError(
                    message, status, provider=self.provider, provider_code=error_code
                )
            return ProviderPermanentError(
                message,
                status,
                provider=self.provider,
                blames_recipient="'to'" in text.lower(),
                provider_code=error_code,
            )
        if error_code in self.ACCOUNT_ERROR_CODES or error_code == self.RATE_LIMIT_EXCEEDED:
            return ProviderTransientError(
                message,
                status,
                provider=self.provider,
                retry_after=_retry_after(response),
                provider_code=error_code,
            )
        return ProviderPermanentError(
            message, status, provider=self.provider, provider_code=error_code
        )
