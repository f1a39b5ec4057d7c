"""Provider webhooks: who sent them, and what they say, in one shape.

Pure functions: no I/O but the certificate fetch injected into :class:`SnsVerifier`,
no clock but the ``now`` the caller passes (and :class:`SnsVerifier`'s injectable
``clock``, used only to check a certificate's validity period).

How each provider authenticates its requests
--------------------------------------------
* **SendGrid** Event Webhook ("Getting Started with the Event Webhook Security
  Features"): ECDSA P-256 over SHA-256 of ``timestamp + raw body`` (raw bytes), the
  signature base64 DER in ``X-Twilio-Email-Event-Webhook-Signature``, the timestamp in
  ``X-Twilio-Email-Event-Webhook-Timestamp``. The verification key is the base64 DER
  SubjectPublicKeyInfo the dashboard shows (PEM is accepted too). SendGrid documents
  no replay window; we refuse timestamps more than ``tolerance`` seconds away.
* **Mailgun** ("Securing Webhooks"): ``HMAC-SHA256(signing key, timestamp + token)``
  as lower-case hex, sent in the body (``signature`` object of the JSON event, or
  the ``timestamp``/``token``/``signature`` form fields of a route POST). Mailgun
  advises caching tokens: the caller keeps ``mailgun_token_key(token)`` in a shared
  store (set-if-absent, TTL at least twice the tolerance) and refuses a token seen
  before.
* **Postmark**: no signature at all; the webhook URL carries HTTP Basic credentials.
* **Amazon SNS** (SES notifications; "Verifying the signatures of Amazon SNS
  messages"): RSA PKCS#1 v1.5 with SHA1 (``SignatureVersion`` "1") or SHA256 ("2")
  over the newline-delimited name/value string-to-sign, whose fields depend on
  ``Type``; the certificate comes from ``SigningCertURL``, which must be HTTPS on an
  ``sns.<region>.amazonaws.com(.cn)`` host (checked before anything is fetched).

Statuses of :class:`WebhookRejected`
------------------------------------
* ``400`` malformed: not the documented JSON/form shape, a timestamp header that is
  not a Unix time, missing required SNS fields, a form without the message.
* ``401`` not authenticated: missing credentials/signature, a signature that does not
  verify, a timestamp outside the replay window (a replayed or delayed request is
  not proof of anything now), an SNS certificate URL off the SNS hosts, an
  unusable/expired certificate or an unknown ``SignatureVersion``.
* ``403`` authenticated but not allowed: an SNS ``TopicArn`` outside the allow-list.

A misconfigured secret (unparsable SendGrid key, empty Mailgun key or Postmark
password) raises ``ValueError``: that is our fault, the caller answers 5xx and the
provider retries. Errors of ``fetch_certificate`` propagate for the same reason.

Normalisation
-------------
Every parser returns :class:`NormalizedEvent` objects of the eight types in
:data:`EVENT_TYPES`; provider events outside them (SendGrid ``processed``, Mailgun
``accepted``, SES ``Send``...) are dropped. ``provider_event_id`` is the provider's
event id when it has one (SendGrid ``sg_event_id``, Mailgun ``id``, Postmark bounce
``ID``, SES ``feedbackId`` + recipient), otherwise ``"sha256:"`` + a digest of the
provider name and the event's canonical JSON (plus the recipient where one
notification fans out to several), stable across the provider's retries.

Mappings worth knowing: SendGrid ``"type": "blocked"`` bounces are ``policy`` (SendGrid
calls them temporary blocks: nothing is wrong with the address); drops for "Bounced
Address"/"Invalid" are ``hard``, other drop reasons ``policy``. Mailgun ``failed``:
``suppress-*`` reasons are drops, ``permanent`` is ``hard`` (or the ``bounce-type`` it
declares), ``temporary`` is ``deferred`` (Mailgun retries it itself, its payload names the
``retry-seconds``; a final failure comes as ``permanent``). Postmark bounce types:
:data:`_POSTMARK_BOUNCES` (``Transient``, which Postmark names "Message delayed", is
``deferred``); a SubscriptionChange is an unsubscribe only for ``ManualSuppression``. SES
``Permanent`` is ``hard``, ``Transient``/``Undetermined`` ``soft`` (SES reports a bounce
only once it has stopped retrying), ``Reject`` a ``policy`` drop, ``DeliveryDelay``
deferred; Open/Click/Reject records name no recipient, so they yield one event per
``mail.destination``. ``deferred`` (SendGrid's own ``deferred`` too) is a delay, never a
bounce: the provider is still trying to deliver the message.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import hmac
import json
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import errors as email_errors
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import collapse_rfc2231_value
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

EVENT_TYPES: Final = frozenset(
    {
        "delivered",
        "opened",
        "clicked",
        "bounced",
        "complained",
        "unsubscribed",
        "deferred",
        "dropped",
    }
)
BOUNCE_TYPES: Final = frozenset({"hard", "soft", "policy"})


class WebhookRejected(Exception):
    """The request is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class NormalizedEvent:
    provider: str
    provider_event_id: str
    type: str
    email: str
    occurred_at: datetime
    delivery_key: str | None = None
    message_id: str | None = None
    provider_message_id: str | None = None
    bounce_type: str | None = None
    url: str | None = None
    user_agent: str | None = None
    ip: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {self.type!r}")
        if self.bounce_type is not None and self.bounce_type not in BOUNCE_TYPES:
            raise ValueError(f"unknown bounce type {self.bounce_type!r}")
        if self.occurred_at.tzinfo is None:
            raise ValueError("occurred_at must be timezone-aware")


def event_to_json(event: NormalizedEvent) -> dict[str, Any]:
    """A normalised event as JSON-ready data (to be kept, e.g. while it waits for its
    message); ``event_from_json`` gives it back."""
    data = dataclasses.asdict(event)
    data["occurred_at"] = event.occurred_at.isoformat()
    return data


def event_from_json(data: dict[str, Any]) -> NormalizedEvent:
    return NormalizedEvent(**{**data, "occurred_at": datetime.fromisoformat(data["occurred_at"])})


# --------------------------------------------------------------------------- helpers


def _malformed(reason: str) -> WebhookRejected:
    return WebhookRejected(400, reason)


def _unauthenticated(reason: str) -> WebhookRejected:
    return WebhookRejected(401, reason)


def _load_json(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed("body is not JSON") from exc


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _derived_id(provider: str, payload: Any, *parts: str) -> str:
    text = "\n".join([provider, _canonical_json(payload), *parts])
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _unix_header(value: str) -> int:
    """A Unix-seconds timestamp header: ASCII digits only."""
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise _malformed("timestamp is not a Unix time")
    return int(text)


def _check_window(timestamp: int, now: float, tolerance: int) -> None:
    if abs(now - timestamp) > tolerance:
        raise _unauthenticated("timestamp outside the replay window")


def _unix_time(value: Any) -> datetime:
    """Unix seconds as int, float or numeric string -> aware UTC datetime."""
    if isinstance(value, bool):
        raise _malformed("timestamp is not a number")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError as exc:
            raise _malformed("timestamp is not a number") from exc
    if not isinstance(value, int | float):
        raise _malformed("timestamp is not a number")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise _malformed("timestamp out of range") from exc


def _iso_time(value: Any) -> datetime:
    """ISO 8601 (``Z`` or an offset; 7 fraction digits as Postmark sends) -> aware UTC."""
    if not isinstance(value, str) or not value.strip():
        raise _malformed("missing ISO 8601 timestamp")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise _malformed(f"not an ISO 8601 timestamp: {value!r}") from exc
    if parsed.tzinfo is None:  # SES and SNS document their times as GMT
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _email(value: Any) -> str:
    if not isinstance(value, str) or "@" not in value:
        raise _malformed("event without a recipient address")
    return value.strip().lower()


def _opt_str(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _angle(value: Any) -> str | None:
    """An RFC 5322 Message-ID with its angle brackets."""
    text = _opt_str(value)
    if text is None:
        return None
    if text.startswith("<") and text.endswith(">"):
        return text
    return f"<{text.strip('<>')}>"


def _pick(source: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    return {name: source[name] for name in names if name in source}


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _malformed(f"{what} is not a JSON object")
    return value


# ------------------------------------------------------------------------- SendGrid


@functools.lru_cache(maxsize=8)
def _sendgrid_key(public_key: str) -> ec.EllipticCurvePublicKey:
    text = public_key.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode("ascii"))
        else:
            der = base64.b64decode("".join(text.split()), validate=True)
            key = serialization.load_der_public_key(der)
    except (ValueError, TypeError, binascii.Error, UnsupportedAlgorithm) as exc:
        raise ValueError("the SendGrid verification key is not a public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("the SendGrid verification key is not an ECDSA P-256 key")
    return key


def verify_sendgrid(
    public_key: str,
    signature: str,
    timestamp: str,
    body: bytes,
    *,
    now: float,
    tolerance: int = 300,
) -> None:
    """Check SendGrid's Signed Event Webhook headers against the raw body."""
    key = _sendgrid_key(public_key)
    if not signature or not signature.strip() or not timestamp or not timestamp.strip():
        raise _unauthenticated("missing X-Twilio-Email-Event-Webhook-Signature/-Timestamp")
    stamp = _unix_header(timestamp)
    try:
        der = base64.b64decode(signature.strip(), validate=True)
    except binascii.Error as exc:
        raise _unauthenticated("signature is not base64") from exc
    try:
        key.verify(der, timestamp.strip().encode("ascii") + body, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError) as exc:
        raise _unauthenticated("invalid signature") from exc
    _check_window(stamp, now, tolerance)


#: SendGrid event -> our type; absent events (processed, group_resubscribe,
#: account_status_change...) are not returned.
_SENDGRID_TYPES: Final[Mapping[str, str]] = {
    "delivered": "delivered",
    "open": "opened",
    "click": "clicked",
    "bounce": "bounced",
    "dropped": "dropped",
    "deferred": "deferred",
    "spamreport": "complained",
    "spam report": "complained",
    "unsubscribe": "unsubscribed",
    "group_unsubscribe": "unsubscribed",
}
#: Drop reasons that say the address itself is bad; the others are policy.
_SENDGRID_HARD_DROPS: Final = frozenset({"bounced address", "invalid", "invalid address"})
_SENDGRID_DETAIL: Final = (
    "reason",
    "status",
    "response",
    "attempt",
    "type",
    "bounce_classification",
    "sg_machine_open",
    "tls",
    "asm_group_id",
)


def _sendgrid_custom_arg(item: Mapping[str, Any], name: str) -> str | None:
    value = _opt_str(item.get(name))  # custom_args/unique_args arrive at top level
    if value is None:
        for nested in ("custom_args", "unique_args"):
            args = item.get(nested)
            if isinstance(args, Mapping):
                value = _opt_str(args.get(name))
                if value is not None:
                    break
    return value


def _sendgrid_message_id(value: Any) -> str | None:
    """The X-Message-Id the send API returned: an event's ``sg_message_id`` is that id
    with a ".filter…" suffix added by SendGrid's pipeline."""
    text = _opt_str(value)
    return text.split(".filter", 1)[0] if text else None


def parse_sendgrid(body: bytes) -> list[NormalizedEvent]:
    """A SendGrid Event Webhook POST: a JSON array of events."""
    data = _load_json(body)
    if not isinstance(data, list):
        raise _malformed("SendGrid posts a JSON array of events")
    events: list[NormalizedEvent] = []
    for item in data:
        item = _mapping(item, "SendGrid event")
        kind = item.get("event")
        mapped = _SENDGRID_TYPES.get(kind.strip().lower()) if isinstance(kind, str) else None
        if mapped is None:
            continue
        bounce_type: str | None = None
        if mapped == "bounced":
            bounce_type = "policy" if _opt_str(item.get("type")) == "blocked" else "hard"
        elif mapped == "dropped":
            reason = (_opt_str(item.get("reason")) or "").lower()
            bounce_type = "hard" if reason in _SENDGRID_HARD_DROPS else "policy"
        events.append(
            NormalizedEvent(
                provider="sendgrid",
                provider_event_id=_opt_str(item.get("sg_event_id"))
                or _derived_id("sendgrid", item),
                type=mapped,
                email=_email(item.get("email")),
                occurred_at=_unix_time(item.get("timestamp")),
                delivery_key=_sendgrid_custom_arg(item, "delivery_key"),
                message_id=_angle(item.get("smtp-id")),
                provider_message_id=_sendgrid_message_id(item.get("sg_message_id")),
                bounce_type=bounce_type,
                url=_opt_str(item.get("url")) if mapped == "clicked" else None,
                user_agent=_opt_str(item.get("useragent")),
                ip=_opt_str(item.get("ip")) if mapped in ("opened", "clicked") else None,
                detail={"event": kind, **_pick(item, _SENDGRID_DETAIL)},
            )
        )
    return events


# -------------------------------------------------------------------------- Mailgun


def verify_mailgun(
    signing_key: str,
    timestamp: str,
    token: str,
    signature: str,
    *,
    now: float,
    tolerance: int = 300,
) -> None:
    """Mailgun's ``HMAC-SHA256(signing_key, timestamp + token)`` and the replay window."""
    if not signing_key:
        raise ValueError("the Mailgun signing key is empty")
    if not timestamp or not token or not signature:
        raise _unauthenticated("missing Mailgun timestamp/token/signature")
    stamp = _unix_header(timestamp)
    expected = hmac.new(
        signing_key.encode("utf-8"), (timestamp + token).encode("utf-8"), hashlib.sha256
    ).hexdigest()
    if not hmac.compare_digest(expected.encode("ascii"), signature.strip().lower().encode()):
        raise _unauthenticated("invalid signature")
    _check_window(stamp, now, tolerance)


def mailgun_token_key(token: str) -> str:
    """Key under which the caller records a used Mailgun token (replay across requests)."""
    return "mailgun-token:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


_MAILGUN_TYPES: Final[Mapping[str, str]] = {
    "delivered": "delivered",
    "opened": "opened",
    "clicked": "clicked",
    "failed": "bounced",
    "complained": "complained",
    "unsubscribed": "unsubscribed",
}
#: ``failed``/``permanent`` reasons where Mailgun did not even try: a suppression.
_MAILGUN_SUPPRESSIONS: Final[Mapping[str, str]] = {
    "suppress-bounce": "hard",
    "suppress-unsubscribe": "policy",
    "suppress-complaint": "policy",
}


def _mailgun_signature(value: Any) -> dict[str, str]:
    signature = _mapping(value, "Mailgun signature")
    out: dict[str, str] = {}
    for name in ("timestamp", "token", "signature"):
        text = _opt_str(signature.get(name))
        if text is None:
            raise _malformed(f"Mailgun signature without {name}")
        out[name] = text
    return out


def _mailgun_event(data: Mapping[str, Any]) -> NormalizedEvent | None:
    kind = data.get("event")
    mapped = _MAILGUN_TYPES.get(kind) if isinstance(kind, str) else None
    if mapped is None:
        return None
    bounce_type: str | None = None
    status = data.get("delivery-status")
    if mapped == "bounced":
        severity = _opt_str(data.get("severity"))
        reason = _opt_str(data.get("reason")) or ""
        if reason in _MAILGUN_SUPPRESSIONS:
            mapped, bounce_type = "dropped", _MAILGUN_SUPPRESSIONS[reason]
        elif severity == "permanent":
            declared = _opt_str(status.get("bounce-type")) if isinstance(status, Mapping) else None
            bounce_type = declared if declared in ("hard", "soft") else "hard"
        else:  # "temporary": Mailgun retries it itself; not a bounce (yet)
            mapped = "deferred"
    message = data.get("message")
    headers = message.get("headers") if isinstance(message, Mapping) else None
    raw_id = _opt_str(headers.get("message-id")) if isinstance(headers, Mapping) else None
    variables = data.get("user-variables")  # an object, or [] when there are none
    client = data.get("client-info")
    return NormalizedEvent(
        provider="mailgun",
        provider_event_id=_opt_str(data.get("id")) or _derived_id("mailgun", data),
        type=mapped,
        email=_email(data.get("recipient")),
        occurred_at=_unix_time(data.get("timestamp")),
        delivery_key=(
            _opt_str(variables.get("delivery_key")) if isinstance(variables, Mapping) else None
        ),
        message_id=_angle(raw_id),
        provider_message_id=raw_id.strip("<>") if raw_id else None,
        bounce_type=bounce_type,
        url=_opt_str(data.get("url")) if mapped == "clicked" else None,
        user_agent=_opt_str(client.get("user-agent")) if isinstance(client, Mapping) else None,
        ip=_opt_str(data.get("ip")),
        detail={
            **_pick(data, ("event", "severity", "reason", "delivery-status")),
            **(_pick(client, ("bot",)) if isinstance(client, Mapping) else {}),
        },
    )


def parse_mailgun(body: bytes) -> tuple[dict[str, str], list[NormalizedEvent]]:
    """A Mailgun webhook POST: ``{"signature": {...}, "event-data": {...}}``.

    Returns the signature (for :func:`verify_mailgun`) and the event, if it is one
    of ours. Parsing does not authenticate: verify before acting on the events.
    """
    data = _mapping(_load_json(body), "Mailgun webhook body")
    signature = _mailgun_signature(data.get("signature"))
    event = _mailgun_event(_mapping(data.get("event-data"), "Mailgun event-data"))
    return signature, [event] if event is not None else []


# ------------------------------------------------------------------------- Postmark


def verify_basic_auth(header: str | None, username: str, password: str) -> None:
    """HTTP Basic credentials of a Postmark webhook URL, compared in constant time."""
    if not password:
        raise ValueError("the Postmark webhook password is empty")
    if header is None or not header.strip():
        raise _unauthenticated("missing Authorization")
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        raise _unauthenticated("not Basic authorization")
    try:
        supplied = base64.b64decode(value.strip(), validate=True)
    except binascii.Error as exc:
        raise _unauthenticated("malformed Basic credentials") from exc
    expected = f"{username}:{password}".encode()
    if not hmac.compare_digest(supplied, expected):
        raise _unauthenticated("wrong credentials")


#: Postmark bounce ``Type`` -> (our type, bounce type). Types absent here and in
#: :data:`_POSTMARK_NOT_BOUNCES` count as soft bounces, the reversible reading.
_POSTMARK_BOUNCES: Final[Mapping[str, tuple[str, str | None]]] = {
    "HardBounce": ("bounced", "hard"),
    "BadEmailAddress": ("bounced", "hard"),
    "SoftBounce": ("bounced", "soft"),
    # "Message delayed": the receiving server will be tried again.
    "Transient": ("deferred", None),
    "DnsError": ("bounced", "soft"),
    "Unknown": ("bounced", "soft"),
    "Blocked": ("bounced", "policy"),
    "SpamNotification": ("bounced", "policy"),
    "VirusNotification": ("bounced", "policy"),
    "DMARCPolicy": ("bounced", "policy"),
    # Postmark did not send: the address is suppressed or the send was refused.
    "ManuallyDeactivated": ("dropped", "policy"),
    "SMTPApiError": ("dropped", "policy"),
    "TemplateRenderingFailed": ("dropped", "policy"),
    "Unconfirmed": ("dropped", "policy"),
    "SpamComplaint": ("complained", None),
    "Unsubscribe": ("unsubscribed", None),
}
#: Bounce records that are not delivery failures (auto-replies, address changes...).
_POSTMARK_NOT_BOUNCES: Final = frozenset(
    {
        "AutoResponder",
        "Subscribe",
        "AddressChange",
        "ChallengeVerification",
        "OpenRelayTest",
        "InboundError",
    }
)
_POSTMARK_BOUNCE_DETAIL: Final = (
    "Type",
    "TypeCode",
    "Name",
    "Description",
    "Details",
    "Inactive",
    "CanActivate",
)


def parse_postmark(body: bytes) -> list[NormalizedEvent]:
    """One Postmark webhook POST: a single JSON object keyed by ``RecordType``."""
    data = _mapping(_load_json(body), "Postmark webhook body")
    record = data.get("RecordType")
    metadata = data.get("Metadata")
    common: dict[str, Any] = {
        "provider": "postmark",
        "provider_message_id": _opt_str(data.get("MessageID")),
        "delivery_key": (
            _opt_str(metadata.get("delivery_key")) if isinstance(metadata, Mapping) else None
        ),
    }
    base_detail = {"RecordType": record, **_pick(data, ("MessageStream", "Tag"))}
    geo = data.get("Geo")
    ip = _opt_str(geo.get("IP")) if isinstance(geo, Mapping) else None
    if record == "Delivery":
        return [
            NormalizedEvent(
                provider_event_id=_derived_id("postmark", data),
                type="delivered",
                email=_email(data.get("Recipient")),
                occurred_at=_iso_time(data.get("DeliveredAt")),
                detail={**base_detail, **_pick(data, ("Details",))},
                **common,
            )
        ]
    if record in ("Bounce", "SpamComplaint"):
        bounce = str(data.get("Type") or "")
        if record == "SpamComplaint":
            kind, bounce_type = "complained", None
        elif bounce in _POSTMARK_NOT_BOUNCES:
            return []
        else:
            kind, bounce_type = _POSTMARK_BOUNCES.get(bounce, ("bounced", "soft"))
        raw_id = data.get("ID")
        return [
            NormalizedEvent(
                provider_event_id=str(raw_id)
                if isinstance(raw_id, int | str) and not isinstance(raw_id, bool) and str(raw_id)
                else _derived_id("postmark", data),
                type=kind,
                email=_email(data.get("Email")),
                occurred_at=_iso_time(data.get("BouncedAt")),
                bounce_type=bounce_type,
                detail={**base_detail, **_pick(data, _POSTMARK_BOUNCE_DETAIL)},
                **common,
            )
        ]
    if record in ("Open", "Click"):
        return [
            NormalizedEvent(
                provider_event_id=_derived_id("postmark", data),
                type="opened" if record == "Open" else "clicked",
                email=_email(data.get("Recipient")),
                occurred_at=_iso_time(data.get("ReceivedAt")),
                url=_opt_str(data.get("OriginalLink")) if record == "Click" else None,
                user_agent=_opt_str(data.get("UserAgent")),
                ip=ip,
                detail={
                    **base_detail,
                    **_pick(data, ("FirstOpen", "ReadSeconds", "Platform", "ClickLocation")),
                },
                **common,
            )
        ]
    if record == "SubscriptionChange":
        # Only a suppression for an unsubscribe ("ManualSuppression") is news: hard
        # bounces and complaints arrive on their own hooks, reactivations are not ours.
        if data.get("SuppressSending") is not True:
            return []
        if data.get("SuppressionReason") != "ManualSuppression":
            return []
        return [
            NormalizedEvent(
                provider_event_id=_derived_id("postmark", data),
                type="unsubscribed",
                email=_email(data.get("Recipient")),
                occurred_at=_iso_time(data.get("ChangedAt")),
                detail={
                    **base_detail,
                    **_pick(data, ("Origin", "SuppressSending", "SuppressionReason")),
                },
                **common,
            )
        ]
    if not isinstance(record, str):
        raise _malformed("Postmark payload without RecordType")
    return []


# --------------------------------------------------------------------- Amazon SNS


_SNS_HOST: Final = re.compile(r"sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?")
_SNS_TYPES: Final[Mapping[str, tuple[str, ...]]] = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
    "UnsubscribeConfirmation": (
        "Message",
        "MessageId",
        "SubscribeURL",
        "Timestamp",
        "Token",
        "TopicArn",
        "Type",
    ),
}
_SNS_HASHES: Final[Mapping[str, Callable[[], hashes.HashAlgorithm]]] = {
    "1": hashes.SHA1,
    "2": hashes.SHA256,
}
_SNS_CACHE_SIZE: Final = 16


def is_sns_certificate_url(url: str) -> bool:
    """Whether ``SigningCertURL`` points at an Amazon SNS host over HTTPS."""
    if not isinstance(url, str) or not url.isascii():
        return False
    if any(ch <= " " or ch in "\\\x7f" for ch in url):
        return False  # parsers disagree on these; real URLs have none
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme == "https"
        and parts.username is None
        and parts.password is None
        and port in (None, 443)
        and parts.hostname is not None
        and _SNS_HOST.fullmatch(parts.hostname) is not None
        and parts.path.endswith(".pem")
        and not parts.query
        and not parts.fragment
    )


def sns_string_to_sign(message: Mapping[str, Any]) -> bytes:
    """The canonical string AWS signs: ``name\\nvalue\\n`` for the ``Type``'s fields,
    in byte order; ``Subject`` only when the notification has one."""
    fields = _SNS_TYPES.get(str(message.get("Type")))
    if fields is None:
        raise _malformed("unknown SNS message Type")
    out: list[str] = []
    for name in fields:
        value = message.get(name)
        if value is None and name == "Subject":
            continue
        if not isinstance(value, str):
            raise _malformed(f"SNS message without {name}")
        out.append(f"{name}\n{value}\n")
    return "".join(out).encode("utf-8")


class SnsVerifier:
    """Verifies Amazon SNS messages (notifications and (un)subscribe confirmations).

    ``fetch_certificate(url)`` returns the PEM at an already-vetted SNS URL; it must
    verify TLS. Certificates are cached by URL (at most 16) and re-checked against
    their validity period on every use.

    The signed ``Timestamp`` (when SNS published the message; its retries keep it) must
    be within ``tolerance`` seconds of ``clock()``: an older message, however well
    signed, is a replay as far as we can tell (401). The tolerance must cover the
    subscription's delivery retry policy, or SNS's late retries are refused too.
    """

    def __init__(
        self,
        allowed_topic_arns: Collection[str],
        fetch_certificate: Callable[[str], Awaitable[bytes]],
        *,
        tolerance: float = 300,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self._topics = frozenset(allowed_topic_arns)
        self._fetch = fetch_certificate
        self._tolerance = tolerance
        self._clock = clock or (lambda: datetime.now(UTC))
        self._certificates: OrderedDict[str, x509.Certificate] = OrderedDict()

    async def verify(self, message: Mapping[str, Any]) -> None:
        if not isinstance(message, Mapping):
            raise _malformed("SNS message is not a JSON object")
        kind = message.get("Type")
        if not isinstance(kind, str) or kind not in _SNS_TYPES:
            raise _malformed("unknown SNS message Type")
        to_sign = sns_string_to_sign(message)
        for name in ("SignatureVersion", "Signature", "SigningCertURL"):
            if not isinstance(message.get(name), str):
                raise _malformed(f"SNS message without {name}")
        hash_factory = _SNS_HASHES.get(message["SignatureVersion"])
        if hash_factory is None:
            raise _unauthenticated("unsupported SNS SignatureVersion")
        if message["TopicArn"] not in self._topics:
            raise WebhookRejected(403, "SNS topic not allowed")
        url: str = message["SigningCertURL"]
        if not is_sns_certificate_url(url):
            raise _unauthenticated("SigningCertURL is not an Amazon SNS HTTPS URL")
        try:
            signature = base64.b64decode(message["Signature"], validate=True)
        except binascii.Error as exc:
            raise _unauthenticated("Signature is not base64") from exc
        published = _iso_time(message["Timestamp"])  # 400 when it is not a timestamp
        public_key = await self._public_key(url)
        try:
            public_key.verify(signature, to_sign, padding.PKCS1v15(), hash_factory())
        except InvalidSignature as exc:
            raise _unauthenticated("invalid signature") from exc
        if abs((self._clock() - published).total_seconds()) > self._tolerance:
            raise _unauthenticated("SNS message Timestamp outside the replay window")

    async def _public_key(self, url: str) -> rsa.RSAPublicKey:
        certificate = self._certificates.get(url)
        if certificate is None:
            pem = await self._fetch(url)
            try:
                certificate = x509.load_pem_x509_certificate(pem)
            except ValueError as exc:
                raise _unauthenticated("SigningCertURL did not return a PEM certificate") from exc
            self._certificates[url] = certificate
            while len(self._certificates) > _SNS_CACHE_SIZE:
                self._certificates.popitem(last=False)
        now = self._clock()
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            self._certificates.pop(url, None)
            raise _unauthenticated("SNS signing certificate outside its validity period")
        public_key = certificate.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise _unauthenticated("SNS signing certificate is not RSA")
        return public_key


# ---------------------------------------------------------------------- Amazon SES

_SES_BOUNCE_TYPES: Final[Mapping[str, str]] = {
    "Permanent": "hard",
    "Transient": "soft",
    "Undetermined": "soft",
}


def _ses_message_id(mail: Mapping[str, Any]) -> str | None:
    headers = mail.get("headers")
    if isinstance(headers, list):
        for header in headers:
            if isinstance(header, Mapping) and str(header.get("name", "")).lower() == "message-id":
                return _angle(header.get("value"))
    return None


def _ses_tag(mail: Mapping[str, Any], name: str) -> str | None:
    tags = mail.get("tags")
    if isinstance(tags, Mapping):
        values = tags.get(name)
        if isinstance(values, list) and values:
            return _opt_str(values[0])
        return _opt_str(values)
    return None


def _ses_recipients(items: Any, what: str) -> list[Mapping[str, Any]]:
    if not isinstance(items, list) or not items:
        raise _malformed(f"SES {what} without recipients")
    return [_mapping(item, f"SES {what} recipient") for item in items]


def parse_ses(sns_message: Mapping[str, Any]) -> list[NormalizedEvent]:
    """The SES notification inside a (verified) SNS ``Notification``, one event per recipient.

    Handles both feedback notifications (``notificationType``: Bounce, Complaint,
    Delivery) and event publishing (``eventType``: also Open, Click, Reject,
    DeliveryDelay). Confirmations and other SES records yield no events.
    """
    if sns_message.get("Type") != "Notification":
        return []
    raw = sns_message.get("Message")
    if not isinstance(raw, str):
        raise _malformed("SNS notification without a Message")
    notification = _mapping(_load_json(raw), "SES notification")
    kind = notification.get("eventType") or notification.get("notificationType")
    if kind not in ("Bounce", "Complaint", "Delivery", "Open", "Click", "Reject", "DeliveryDelay"):
        return []
    mail = _mapping(notification.get("mail"), "SES mail")
    common: dict[str, Any] = {
        "provider": "ses",
        "delivery_key": _ses_tag(mail, "delivery_key"),
        "message_id": _ses_message_id(mail),
        "provider_message_id": _opt_str(mail.get("messageId")),
    }
    events: list[NormalizedEvent] = []

    def derived(recipient: str) -> str:
        return _derived_id("ses", notification, recipient)

    if kind == "Bounce":
        bounce = _mapping(notification.get("bounce"), "SES bounce")
        bounce_type = _SES_BOUNCE_TYPES.get(str(bounce.get("bounceType")), "soft")
        feedback = _opt_str(bounce.get("feedbackId"))
        when = _iso_time(bounce.get("timestamp"))
        shared = _pick(bounce, ("bounceType", "bounceSubType", "reportingMTA", "remoteMtaIp"))
        for recipient in _ses_recipients(bounce.get("bouncedRecipients"), "bounce"):
            email = _email(recipient.get("emailAddress"))
            events.append(
                NormalizedEvent(
                    provider_event_id=f"{feedback}:{email}" if feedback else derived(email),
                    type="bounced",
                    email=email,
                    occurred_at=when,
                    bounce_type=bounce_type,
                    detail={
                        **shared,
                        **_pick(recipient, ("action", "status", "diagnosticCode")),
                    },
                    **common,
                )
            )
    elif kind == "Complaint":
        complaint = _mapping(notification.get("complaint"), "SES complaint")
        feedback = _opt_str(complaint.get("feedbackId"))
        when = _iso_time(complaint.get("timestamp"))
        detail = _pick(
            complaint,
            ("complaintFeedbackType", "complaintSubType", "userAgent", "arrivalDate"),
        )
        for recipient in _ses_recipients(complaint.get("complainedRecipients"), "complaint"):
            email = _email(recipient.get("emailAddress"))
            events.append(
                NormalizedEvent(
                    provider_event_id=f"{feedback}:{email}" if feedback else derived(email),
                    type="complained",
                    email=email,
                    occurred_at=when,
                    detail=dict(detail),
                    **common,
                )
            )
    elif kind == "Delivery":
        delivery = _mapping(notification.get("delivery"), "SES delivery")
        when = _iso_time(delivery.get("timestamp"))
        detail = _pick(
            delivery, ("smtpResponse", "reportingMTA", "remoteMtaIp", "processingTimeMillis")
        )
        recipients = delivery.get("recipients")
        if not isinstance(recipients, list) or not recipients:
            raise _malformed("SES delivery without recipients")
        for address in recipients:
            email = _email(address)
            events.append(
                NormalizedEvent(
                    provider_event_id=derived(email),
                    type="delivered",
                    email=email,
                    occurred_at=when,
                    detail=dict(detail),
                    **common,
                )
            )
    elif kind == "DeliveryDelay":
        delay = _mapping(notification.get("deliveryDelay"), "SES deliveryDelay")
        when = _iso_time(delay.get("timestamp"))
        shared = _pick(delay, ("delayType", "expirationTime"))
        for recipient in _ses_recipients(delay.get("delayedRecipients"), "deliveryDelay"):
            email = _email(recipient.get("emailAddress"))
            events.append(
                NormalizedEvent(
                    provider_event_id=derived(email),
                    type="deferred",
                    email=email,
                    occurred_at=when,
                    detail={**shared, **_pick(recipient, ("status", "diagnosticCode"))},
                    **common,
                )
            )
    else:  # Open, Click, Reject: the record names no recipient, the mail's destination does
        destination = mail.get("destination")
        if not isinstance(destination, list) or not destination:
            raise _malformed("SES mail without destination")
        if kind == "Reject":
            reject = _mapping(notification.get("reject"), "SES reject")
            when = _iso_time(mail.get("timestamp"))
            detail = _pick(reject, ("reason",))
            type_, bounce_type = "dropped", "policy"
            url = user_agent = ip = None
        else:
            engagement = _mapping(notification.get(kind.lower()), f"SES {kind.lower()}")
            when = _iso_time(engagement.get("timestamp"))
            detail = {}
            type_, bounce_type = ("opened" if kind == "Open" else "clicked"), None
            url = _opt_str(engagement.get("link")) if kind == "Click" else None
            user_agent = _opt_str(engagement.get("userAgent"))
            ip = _opt_str(engagement.get("ipAddress"))
        for address in destination:
            email = _email(address)
            events.append(
                NormalizedEvent(
                    provider_event_id=derived(email),
                    type=type_,
                    email=email,
                    occurred_at=when,
                    bounce_type=bounce_type,
                    url=url,
                    user_agent=user_agent,
                    ip=ip,
                    detail=dict(detail),
                    **common,
                )
            )
    return events


# ------------------------------------------------------------------ inbound email

_FORM_URLENCODED: Final = "application/x-www-form-urlencoded"
_FORM_MULTIPART: Final = "multipart/form-data"
_BROKEN_MULTIPART: Final = (
    email_errors.StartBoundaryNotFoundDefect,
    email_errors.CloseBoundaryNotFoundDefect,
    email_errors.NoBoundaryInMultipartDefect,
    email_errors.MultipartInvariantViolationDefect,
)
_HEADER_NAME: Final = re.compile(rb"[!-9;-~]+")
_HEADER_NAME_STR: Final = re.compile(r"[!-9;-~]+")
#: The rebuilt message carries its own body, so the original's MIME framing goes.
_MIME_FRAMING: Final = frozenset({b"content-type", b"content-transfer-encoding", b"mime-version"})
_BODY_POLICY: Final = email_policy.SMTP.clone(cte_type="7bit")


def _form_fields(body: bytes, content_type: str) -> dict[str, list[bytes]]:
    """Fields of a form POST (urlencoded or multipart/form-data), values as raw bytes."""
    if not content_type or not content_type.isascii() or any(c in content_type for c in "\r\n"):
        raise _malformed("bad Content-Type")
    parser = BytesParser(policy=email_policy.HTTP)
    head = b"Content-Type: " + content_type.encode("ascii") + b"\r\n\r\n"
    mime = parser.parsebytes(head).get_content_type()
    fields: dict[str, list[bytes]] = {}
    if mime == _FORM_URLENCODED:
        try:
            text = body.decode("ascii")
            pairs = (
                parse_qsl(
                    text,
                    keep_blank_values=True,
                    strict_parsing=True,
                    encoding="latin-1",
                    errors="strict",
                )
                if text
                else []
            )
        except (UnicodeDecodeError, ValueError) as exc:
            raise _malformed("malformed urlencoded form") from exc
        for name, value in pairs:
            fields.setdefault(name, []).append(value.encode("latin-1"))
        return fields
    if mime != _FORM_MULTIPART:
        raise _malformed(f"expected a form POST, got {mime}")
    message = parser.parsebytes(head + body)
    if not message.is_multipart() or any(isinstance(d, _BROKEN_MULTIPART) for d in message.defects):
        raise _malformed("malformed multipart/form-data body")
    for part in message.iter_parts():
        raw_name = part.get_param("name", header="content-disposition")
        if raw_name is None:
            continue
        name = collapse_rfc2231_value(raw_name)
        if part.is_multipart():
            raise _malformed(f"form field {name!r} is itself multipart")
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            fields.setdefault(name, []).append(payload)
    return fields


def _first(fields: Mapping[str, list[bytes]], name: str) -> bytes | None:
    values = fields.get(name)
    return values[0] if values else None


def _decode_text(value: bytes | None, charset: str) -> str | None:
    if value is None:
        return None
    try:
        return value.decode(charset, "replace")
    except LookupError:
        return value.decode("utf-8", "replace")


def _header_block(block: bytes) -> list[bytes]:
    """A raw header block -> whole header fields (folds kept, CRLF line ends)."""
    fields: list[list[bytes]] = []
    for line in block.replace(b"\r\n", b"\n").split(b"\n"):
        if not line.strip():
            if fields:
                break  # the block ends at its first empty line
            continue
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise _malformed("header block starts with a continuation line")
            fields[-1].append(line)
            continue
        name, colon, _ = line.partition(b":")
        if not colon or not _HEADER_NAME.fullmatch(name):
            raise _malformed("malformed header line")
        fields.append([line])
    if not fields:
        raise _malformed("empty header block")
    return [b"\r\n".join(lines) for lines in fields]


def _header_field(name: Any, value: Any) -> bytes:
    """One ``[name, value]`` pair of Mailgun's ``message-headers`` as a header field."""
    if not isinstance(name, str) or not _HEADER_NAME_STR.fullmatch(name):
        raise _malformed("bad header name in message-headers")
    if not isinstance(value, str):
        raise _malformed(f"bad value for header {name}")
    value = re.sub(r"\r?\n(?=[ \t])", "", value)
    if "\r" in value or "\n" in value:
        raise _malformed(f"line break in header {name}")
    if value.isascii():
        return f"{name}: {value}".encode("ascii")
    try:  # RFC 2047-encode what is not ASCII, keeping address syntax intact
        header = _BODY_POLICY.header_factory(name, value)
        return header.fold(policy=_BODY_POLICY).rstrip("\r\n").encode("ascii")
    except (ValueError, TypeError, IndexError, UnicodeError) as exc:
        raise _malformed(f"unencodable header {name}") from exc


def _rebuild(header_fields: list[bytes], text: str | None, html: str | None) -> bytes:
    """Original headers (minus MIME framing) over a fresh text (+ html) body."""
    kept = [
        item
        for item in header_fields
        if item.partition(b":")[0].strip().lower() not in _MIME_FRAMING
    ]
    body = EmailMessage(policy=_BODY_POLICY)
    if text is None and html is not None:
        body.set_content(html, subtype="html")
    else:
        body.set_content(text or "")
        if html is not None:
            body.add_alternative(html, subtype="html")
            # Same input, same bytes (a retried POST must rebuild the same message):
            # a boundary from the content rather than a random one. "=_" cannot occur
            # in quoted-printable or base64 bodies.
            digest = hashlib.sha256()
            for piece in (*kept, (text or "").encode(), html.encode()):
                digest.update(hashlib.sha256(piece).digest())
            body.set_boundary("=_" + digest.hexdigest()[:40])
    return b"".join(item + b"\r\n" for item in kept) + body.as_bytes(policy=_BODY_POLICY)


def _json_object(value: bytes | None) -> Mapping[str, Any]:
    if value is None:
        return {}
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, Mapping) else {}


def inbound_from_sendgrid_parse(body: bytes, content_type: str) -> bytes:
    """The RFC 822 message of a SendGrid Inbound Parse POST.

    With "POST the raw, full MIME message" the ``email`` field is returned as is;
    otherwise the message is rebuilt from the ``headers`` block and the ``text``
    (and ``html``) fields, decoded with the charsets SendGrid reports in ``charsets``.
    """
    fields = _form_fields(body, content_type)
    raw = _first(fields, "email")
    if raw is not None and raw.strip():
        return raw
    headers = _first(fields, "headers")
    if headers is None or not headers.strip():
        raise _malformed("Inbound Parse POST without email or headers")
    charsets = _json_object(_first(fields, "charsets"))

    def charset(name: str) -> str:
        value = charsets.get(name)
        return value if isinstance(value, str) and value else "utf-8"

    return _rebuild(
        _header_block(headers),
        _decode_text(_first(fields, "text"), charset("text")),
        _decode_text(_first(fields, "html"), charset("html")),
    )


def mailgun_route_signature(body: bytes, content_type: str) -> dict[str, str]:
    """``timestamp``/``token``/``signature`` of a Mailgun route POST, for :func:`verify_mailgun`."""
    fields = _form_fields(body, content_type)
    out: dict[str, str] = {}
    for name in ("timestamp", "token", "signature"):
        value = _first(fields, name)
        if value is None or not value.strip():
            raise _malformed(f"Mailgun route POST without {name}")
        try:
            out[name] = value.decode("ascii").strip()
        except UnicodeDecodeError as exc:
            raise _malformed(f"non-ASCII {name}") from exc
    return out


def inbound_from_mailgun_route(body: bytes, content_type: str) -> bytes:
    """The RFC 822 message of a Mailgun route ``forward()`` POST.

    Raw MIME routes (URL ending in ``mime``) post ``body-mime``, returned as is;
    parsed routes are rebuilt from ``message-headers`` (a JSON list of
    ``[name, value]``) and ``body-plain`` (plus ``body-html``), which Mailgun
    transcodes to UTF-8.
    """
    fields = _form_fields(body, content_type)
    raw = _first(fields, "body-mime")
    if raw is not None and raw.strip():
        return raw
    listed = _first(fields, "message-headers")
    if listed is None:
        raise _malformed("Mailgun route POST without body-mime or message-headers")
    try:
        pairs = json.loads(listed)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed("message-headers is not JSON") from exc
    if not isinstance(pairs, list) or not pairs:
        raise _malformed("message-headers is not a list of [name, value]")
    header_fields: list[bytes] = []
    for pair in pairs:
        if not isinstance(pair, list) or len(pair) != 2:
            raise _malformed("message-headers is not a list of [name, value]")
        header_fields.append(_header_field(pair[0], pair[1]))
    return _rebuild(
        header_fields,
        _decode_text(_first(fields, "body-plain"), "utf-8"),
        _decode_text(_first(fields, "body-html"), "utf-8"),
    )


__all__ = [
    "BOUNCE_TYPES",
    "EVENT_TYPES",
    "NormalizedEvent",
    "SnsVerifier",
    "WebhookRejected",
    "inbound_from_mailgun_route",
    "inbound_from_sendgrid_parse",
    "is_sns_certificate_url",
    "mailgun_route_signature",
    "mailgun_token_key",
    "parse_mailgun",
    "parse_postmark",
    "parse_sendgrid",
    "parse_ses",
    "sns_string_to_sign",
    "verify_basic_auth",
    "verify_mailgun",
    "verify_sendgrid",
]
