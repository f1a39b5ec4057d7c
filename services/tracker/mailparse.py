"""Inbound mail classification for the tracker, no I/O.

* :func:`parse_bounce`: delivery status notifications (RFC 3464 ``multipart/report;
  report-type=delivery-status``) and the older plain-text bounces (qmail, Exim, Sendmail,
  Exchange, Gmail), classified hard / soft / policy (:func:`classify_bounce`), or
  ``delayed`` for a delay notice: the remote MTA is still trying, nothing has failed yet.
* :func:`classify_auto_reply`: RFC 3834 automatic replies, out-of-office notices in several
  languages, with the stated return date (:func:`parse_return_date`).
* :func:`reply_text`: what the person wrote, without quoted history or signature.
* :func:`wants_unsubscribe`: a reply asking to be removed (only its new text counts).

Every function takes untrusted input and never raises on it: anything that cannot be read
is "not a bounce" / "not an automatic reply" / empty text.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import html
import io
import quopri
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from email import message_from_bytes, message_from_string
from email.errors import MessageError
from email.generator import Generator
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses

__all__ = [
    "DELAYED",
    "AutoReply",
    "Bounce",
    "classify_auto_reply",
    "classify_bounce",
    "parse_bounce",
    "parse_return_date",
    "reply_text",
    "wants_unsubscribe",
]


#: The kind of a delay notice (DSN ``Action: delayed``): not a bounce.
DELAYED = "delayed"


@dataclass(frozen=True, slots=True)
class Bounce:
    kind: str  # "hard" | "soft" | "policy" for a failure; "delayed" for a delay notice
    status: str | None  # enhanced status code, e.g. "5.1.1"
    action: str | None  # DSN Action: failed / delayed (inferred for plain-text bounces)
    diagnostic: str | None  # Diagnostic-Code as given, unfolded
    recipient: str | None  # lower-cased address, without "rfc822;"
    original_message_id: str | None  # "<...>" of the message that bounced
    remote_mta: str | None
    raw_report: str  # the message/delivery-status text, or the human text of a plain bounce

    @property
    def final(self) -> bool:
        """A delivery failure; False for a delay notice (the remote MTA keeps trying, so
        the message may still arrive: it is not a bounce and must not be sent again)."""
        return self.kind != DELAYED


@dataclass(frozen=True, slots=True)
class AutoReply:
    kind: str  # "out_of_office" | "auto_reply"
    return_date: date | None


# --------------------------------------------------------------------------- MIME helpers

_MESSAGE_ID = re.compile(r"<[^<>\s]+>")
#: What the standard library raises on malformed mail (bad charsets, broken encodings...).
_UNREADABLE = (
    ValueError,
    LookupError,
    TypeError,
    UnicodeError,
    AttributeError,
    IndexError,
    AssertionError,
    MessageError,
)
_CHARSET_ALIASES = {"unicode-1-1-utf-7": "utf-7", "x-unknown": "utf-8", "unknown-8bit": "utf-8"}


def _parse(raw: bytes) -> Message | None:
    if not raw or not raw.strip():
        return None
    try:
        message = message_from_bytes(raw)
    except _UNREADABLE:  # pragma: no cover - defensive
        return None
    return message if message.keys() else None


def _fix(text: str) -> str:
    """Undo the parser's surrogate escapes: undecodable bytes become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _header(message: Message, name: str) -> str:
    """A header, RFC 2047-decoded and unfolded; "" when absent or unreadable."""
    value = message.get(name)
    if value is None:
        return ""
    text = str(value)
    with contextlib.suppress(*_UNREADABLE):
        text = str(make_header(decode_header(text)))
    return re.sub(r"\r?\n(?=[ \t])", "", _fix(text)).strip()


def _decode_bytes(data: bytes, charset: str | None) -> str:
    name = (charset or "utf-8").strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    for candidate in (name, "utf-8"):
        try:
            return data.decode(candidate)
        except (LookupError, UnicodeDecodeError, ValueError):
            continue
    return data.decode("cp1252", "replace")


def _flatten(message: Message) -> str:
    buffer = io.StringIO()
    Generator(buffer, mangle_from_=False, maxheaderlen=0).flatten(message)
    return _fix(buffer.getvalue())


def _part_text(part: Message) -> str:
    """The decoded body of one part. message/* parts (which the parser splits into header
    blocks) are put back together as text."""
    payload = part.get_payload()
    if isinstance(payload, list):
        text = _flatten(part)
        _, _, body = text.partition("\n\n")
        encoding = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
        if encoding == "base64":
            try:
                return _decode_bytes(base64.b64decode(body.encode("ascii", "ignore")), None)
            except (binascii.Error, ValueError):
                return body
        if encoding == "quoted-printable":
            return _decode_bytes(quopri.decodestring(body.encode("utf-8", "replace")), None)
        return body
    data = part.get_payload(decode=True)
    if not isinstance(data, bytes):
        return _fix(str(payload or ""))
    return _decode_bytes(data, part.get_content_charset())


def _parts(message: Message) -> Iterator[Message]:
    """Leaf parts in order, descending into multiparts but not into attached messages."""
    stack = [message]
    while stack:
        part = stack.pop()
        payload = part.get_payload()
        if part.get_content_maintype() == "multipart" and isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))
        else:
            yield part


def _is_attachment(part: Message) -> bool:
    return str(part.get("Content-Disposition", "")).strip().lower().startswith("attachment")


_QUOTE_HTML = re.compile(
    r"""<div[^<>]*class=["']?(?:gmail_quote|yahoo_quoted|moz-cite-prefix)"""
    r"""|<div[^<>]*id=["']?(?:x_)?(?:divRplyFwdMsg|appendonsend)"""
    r"""|<blockquote""",
    re.IGNORECASE,
)
_HIDDEN_OPEN = re.compile(r"<(head|style|script|title)\b[^<>]*>|<!--", re.IGNORECASE)


def _drop_hidden(markup: str) -> str:
    """Remove <head>, <style>, <script>, <title> elements and comments, in linear time
    (an unclosed one runs to the end)."""
    lower = markup.lower()
    kept: list[str] = []
    position = 0
    while True:
        opening = _HIDDEN_OPEN.search(markup, position)
        if opening is None:
            kept.append(markup[position:])
            break
        kept.append(markup[position : opening.start()])
        closing = "-->" if opening.group(0) == "<!--" else f"</{opening.group(1).lower()}"
        end = lower.find(closing, opening.end())
        if end < 0:
            break
        position = lower.find(">", end) + 1 if closing != "-->" else end + 3
        if position <= 0:
            break
    return "".join(kept)


def _html_to_text(markup: str) -> str:
    quote = _QUOTE_HTML.search(markup)
    if quote:
        markup = markup[: quote.start()]
    text = _drop_hidden(markup)
    text = re.sub(r"(?i)<br\s*/?>", "\n", text)
    text = re.sub(r"(?i)</(p|div|h[1-6]|li|tr|table|blockquote|pre)\s*>", "\n\n", text)
    text = re.sub(r"(?i)<hr\b[^<>]*>", "\n\n", text)
    text = re.sub(r"<[^<>]*>", "", text)
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _body_text(message: Message) -> str:
    """The readable text of a message: its first text/plain part, else its first text/html
    part as text; attached messages and attachments are not looked at."""
    html_part: Message | None = None
    for part in _parts(message):
        if _is_attachment(part):
            continue
        content_type = part.get_content_type()
        if content_type == "text/plain":
            return _part_text(part).replace("\r\n", "\n").replace("\r", "\n")
        if content_type == "text/html" and html_part is None:
            html_part = part
    if html_part is not None:
        return _html_to_text(_part_text(html_part))
    return ""


def _first_message_id(value: str) -> str | None:
    found = _MESSAGE_ID.findall(value)
    if found:
        return str(found[0])
    token = value.strip()
    if token and "@" in token and not re.search(r"\s", token):
        return f"<{token}>"
    return None


def _fold(text: str) -> str:
    """Lower-case, accents stripped, typographic apostrophes made plain: for matching."""
    decomposed = unicodedata.normalize("NFKD", text.replace("ß", "ss"))
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return stripped.replace("\u2019", "'").replace("\u2018", "'").lower()


# --------------------------------------------------------------------------- bounces

_ENHANCED = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")
_ENHANCED_FAILURE = re.compile(r"(?<![\w.])([45])\.(\d{1,3})\.(\d{1,3})(?!\d|\.\d)")
_BASIC_CODE = re.compile(r"(?<![\w.:\[-])([45]\d\d)(?=[\s-]|$)")

#: Hard rejections named in the text. "Recipient address rejected: Access denied" is
#: Exchange Online's Directory-Based Edge Blocking: the mailbox does not exist.
_TEXT_HARD = re.compile(
    r"recipient address rejected: access denied"
    r"|user unknown|unknown user|unknown (?:recipient|mailbox|address|local[- ]part)"
    r"|no such (?:user|mailbox|recipient|address|account|person)"
    r"|(?:does|did) ?n[o']t exist|not exist"
    r"|recipient (?:unknown|not found|does not exist|rejected)"
    r"|invalid (?:recipient|mailbox|address|user|e-?mail address)"
    r"|mailbox (?:unavailable|not found|does not exist|(?:is )?disabled|(?:is )?inactive)"
    r"|address (?:not found|unknown|does not exist)|user not found|addressee unknown"
    r"|account (?:(?:has been|is|was) )?(?:disabled|deactivated|closed|suspended|inactive)"
    r"|no longer (?:active|available|valid|exists|in use)"
    r"|not a valid (?:recipient|mailbox|user|address)|not listed in"
    r"|unrouteable address|no mailbox|bad destination mailbox"
    r"|(?:doesn't|does not) have an? [\w.-]+ account"
    r"|host or domain name not found|domain (?:name )?not found|nxdomain|no mx (?:record|host)",
    re.IGNORECASE,
)
_TEXT_POLICY = re.compile(
    r"spam|blocked|block ?list|black ?list|deny ?list|\bpolicy\b|policies|reputation"
    r"|dmarc|\bspf\b|\bdkim\b|\brbl\b|\bdnsbl\b|spamhaus|barracuda|proofpoint"
    r"|not (?:authori[sz]ed|permitted|allowed)|unauthori[sz]ed|unauthenticated"
    r"|virus|malware|phish|banned|prohibit|unsolicited|bulk mail"
    r"|content rejected|message content|rejected (?:for|due to|because)"
    r"|relay(?:ing)? (?:access )?denied|sender (?:address )?(?:denied|rejected|blocked)",
    re.IGNORECASE,
)
_TEXT_SOFT = re.compile(
    r"quota|mailbox (?:is )?full|\bfull\b|insufficient (?:system )?storage|out of (?:disk )?space"
    r"|storage (?:space|limit)|try (?:again|later)|temporar|greylist|graylist|rate limit"
    r"|too many|timed? ?out|deferred|busy|\blater\b",
    re.IGNORECASE,
)
_DOMAIN_GONE = re.compile(
    r"host or domain name not found|domain (?:name )?not found|(?:does|did) ?n[o']t exist"
    r"|nxdomain|no mx (?:record|host)|host not found|name service error",
    re.IGNORECASE,
)


def _kind_from_text(text: str) -> str | None:
    """The diagnostic's words, for codes that say too little. The recipient-specific
    "Access denied" first, then policy (a blocked sender is not a dead address), then hard,
    then soft."""
    if not text:
        return None
    if re.search(r"recipient address rejected: access denied", text, re.IGNORECASE):
        return "hard"
    if _TEXT_POLICY.search(text):
        return "policy"
    if _TEXT_HARD.search(text):
        return "hard"
    if _TEXT_SOFT.search(text):
        return "soft"
    return None


def _kind_for_permanent(subject: int, detail: int, text: str) -> str:
    """The table for 5.X.Y (RFC 3463 and the IANA registry; Exchange Online's codes)."""
    hinted = _kind_from_text(text)
    if subject == 1:  # addressing
        if detail in (7, 8):  # bad sender address: the sender's problem
            return "policy"
        if detail == 0:  # Exchange Online also says 5.1.0 for "Sender denied"
            return hinted or "hard"
        return "hard"  # 5.1.1 bad mailbox, 5.1.2 bad domain, 5.1.3 syntax, 5.1.6 moved, 5.1.10
    if subject == 2:  # mailbox
        if detail == 1:
            return "hard"  # mailbox disabled
        if detail in (2, 4, 121, 122):
            return "soft"  # full; list expansion; Exchange Online per-hour receive limits
        if detail == 3:
            return "policy"  # message too long for the mailbox
        return hinted or "hard"
    if subject == 3:  # mail system
        if detail == 4:
            return "policy"  # message too big for the system
        return hinted or "soft"
    if subject == 4:  # network and routing
        if detail in (1, 310):  # no answer / Exchange Online "access denied"; DNS domain gone
            return "hard"
        return "hard" if _DOMAIN_GONE.search(text) else "soft"
    if subject == 5:  # protocol
        if detail == 0:
            return hinted or "hard"  # "mailbox unavailable"
        return hinted or "soft"
    if subject == 6:
        return "policy"  # media / content
    if subject == 7:  # security and policy
        if detail in (13, 17, 18):  # account disabled; mailbox / domain owner changed
            return "hard"
        return "policy"
    return hinted or "hard"  # 5.0.0 and unknown subjects


def classify_bounce(action: str | None, status: str | None, diagnostic: str | None) -> str:
    """hard / soft / policy for one failed recipient; ``delayed`` for a delay notice.

    Action ``delayed`` is a delay notice whatever the code: the reporting MTA is still
    retrying, nothing failed. For a failure, 4.X.Y is soft (the MTA gave up on it, but the
    address was not shown to be bad); 5.X.Y follows :func:`_kind_for_permanent`; with no
    enhanced code, the basic SMTP code's class and the diagnostic's words decide, and a
    permanent failure that says nothing more is hard."""
    text = diagnostic or ""
    if action and action.strip().lower().startswith("delayed"):
        return DELAYED
    found = _ENHANCED.search(status or "") or _ENHANCED_FAILURE.search(text)
    if found:
        klass, subject, detail = found.group(1), int(found.group(2)), int(found.group(3))
        if klass == "4":
            return "soft"
        if klass == "5":
            return _kind_for_permanent(subject, detail, text)
    basic = _BASIC_CODE.search(text)
    if basic and basic.group(1).startswith("4"):
        return "soft"
    return _kind_from_text(text) or "hard"


def _dsn_groups(text: str) -> list[dict[str, str]]:
    """The header groups of a message/delivery-status body, names lower-cased, values
    unfolded: a line break and the indentation after it become one space."""
    groups: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            if current:
                groups.append(current)
            current, last = {}, None
            continue
        if line[0] in " \t" and last is not None:
            current[last] = f"{current[last].rstrip()} {line.strip()}"
            continue
        name, colon, value = line.partition(":")
        name = name.strip().lower()
        if not colon or not name or " " in name:
            last = None
            continue
        if name not in current:
            current[name] = value.strip()
            last = name
        else:
            last = None
    if current:
        groups.append(current)
    return groups


def _address(value: str | None) -> str | None:
    """The address of a recipient field: "rfc822; Jane@Example.org" -> "jane@example.org"."""
    if not value:
        return None
    kind, semicolon, address = value.partition(";")
    if not semicolon:
        address, kind = value, "rfc822"
    kind = kind.strip().lower()
    if kind not in ("rfc822", "utf-8", "utf8", ""):
        return None
    address = re.sub(r"\s*\([^)]*\)\s*$", "", address).strip().strip("<>").strip()
    if kind.startswith("utf"):
        address = re.sub(
            r"\\x\{([0-9A-Fa-f]{1,6})\}", lambda m: chr(min(int(m.group(1), 16), 0x10FFFF)), address
        )
    return address.lower() if "@" in address else None


def _host(value: str | None) -> str | None:
    """The host of an MTA field: "dns; mx.example.org. (192.0.2.1, ...)" -> "mx.example.org"."""
    if not value:
        return None
    _, semicolon, rest = value.partition(";")
    host = (rest if semicolon else value).strip()
    host = re.split(r"[\s(]", host, maxsplit=1)[0].strip("[]").rstrip(".").lower()
    return host or None


def _action(value: str | None) -> str | None:
    if not value:
        return None
    word = value.strip().split()
    return word[0].lower().rstrip(";,") if word else None


def _status_code(status_field: str | None, diagnostic: str | None) -> str | None:
    """The DSN's Status; a generic X.0.0 gives way to a more precise code of the same class
    named in the diagnostic ("Status: 5.0.0" with "550 5.1.1 user unknown" -> 5.1.1)."""
    given = _ENHANCED.search(status_field or "")
    said = _ENHANCED_FAILURE.search(diagnostic or "")
    if given is None:
        return said.group(0) if said else None
    code = given.group(0)
    if said and code.endswith(".0.0") and said.group(1) == given.group(1) and said.group(0) != code:
        return said.group(0)
    return code


_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_SUCCESS_ACTIONS = ("delivered", "relayed", "expanded")


def _original_message_id(message: Message, extra_ids: list[str], text: str) -> str | None:
    """From the returned message or its headers, else X-Original-Message-ID, else a
    Message-ID quoted in the human text, else the bounce's References / In-Reply-To."""
    for part in _parts(message):
        content_type = part.get_content_type()
        if content_type in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                found = _first_message_id(_header(payload[0], "Message-ID"))
                if found:
                    return found
        elif content_type in ("text/rfc822-headers", "text/global-headers"):
            headers = message_from_string(_part_text(part).lstrip())
            found = _first_message_id(_header(headers, "Message-ID"))
            if found:
                return found
    for candidate in [_header(message, "X-Original-Message-ID"), *extra_ids]:
        found = _first_message_id(candidate)
        if found:
            return found
    quoted = re.search(
        r"^[ \t>]*Message-ID[ \t]*:[ \t]*(<[^<>\s]+>)", text, re.MULTILINE | re.IGNORECASE
    )
    if quoted:
        return quoted.group(1)
    for name in ("References", "In-Reply-To"):
        ids = _MESSAGE_ID.findall(_header(message, name))
        if ids:
            return str(ids[-1])
    return None


def _from_dsn(message: Message) -> Bounce | bool | None:
    """A Bounce from the delivery-status part; None when the report names no failure
    (a success DSN); False when there is no usable report."""
    report_part = next((p for p in _parts(message) if p.get_content_type() in _DSN_TYPES), None)
    if report_part is None:
        return False
    report = _part_text(report_part)
    groups = _dsn_groups(report)
    per_message = groups[0] if groups and "reporting-mta" in groups[0] else {}
    recipients = [
        g
        for g in groups
        if {"final-recipient", "original-recipient", "action", "status"} & g.keys()
    ]
    if not recipients:
        return False
    # A failed recipient is reported before a delayed one: a delay notice is not a bounce.
    chosen: dict[str, str] | None = None
    delayed: dict[str, str] | None = None
    for group in recipients:
        group_action = _action(group.get("action"))
        group_status = _ENHANCED.search(group.get("status", ""))
        if group_action is None and group_status is not None:
            group_action = {"4": "delayed", "5": "failed"}.get(group_status.group(1))
        if group_action == "failed":
            chosen = group
            break
        if group_action == "delayed" and delayed is None:
            delayed = group
    chosen = chosen or delayed
    if chosen is None:
        if all(_action(g.get("action")) in _SUCCESS_ACTIONS for g in recipients):
            return None
        return False
    action = _action(chosen.get("action"))
    diagnostic = chosen.get("diagnostic-code") or None
    status = _status_code(chosen.get("status"), diagnostic)
    if action is None:
        action = "delayed" if status and status.startswith("4") else "failed"
    human = _body_text(message)
    kind = classify_bounce(action, status, diagnostic or human)
    recipient = _address(chosen.get("original-recipient")) or _address(
        chosen.get("final-recipient")
    )
    if recipient is None:
        recipient = _failed_recipient_header(message)
    remote = _host(chosen.get("remote-mta")) or _remote_from_text(diagnostic or "")
    extra_ids = [
        per_message.get("x-original-message-id", ""),
        chosen.get("x-original-message-id", ""),
    ]
    original = _original_message_id(message, extra_ids, human)
    return Bounce(kind, status, action, diagnostic, recipient, original, remote, report.strip("\n"))


# Plain-text bounces --------------------------------------------------------------------

_DAEMON_LOCAL = re.compile(
    r"^(?:mailer[-_.]?daemon|postmaster|mail[-_.]?daemon|mdaemon|microsoftexchange[0-9a-f]*)$",
    re.IGNORECASE,
)
_DAEMON_NAME = re.compile(
    r"mail delivery (?:subsystem|system|service)|mailer[- ]?daemon|postmaster"
    r"|mail administrator|system administrator|microsoft (?:outlook|exchange)",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"^\s*(?:undeliver(?:able|ed)|undelivered mail returned to sender|mail delivery failed"
    r"|returned mail|failure notice|delivery status notification \((?:failure|delay)\)"
    r"|delivery (?:failure|failed|delayed|has failed|problem)|mail (?:system|delivery) error"
    r"|non[- ]?remis|unzustellbar|nicht zustellbar|no se puede entregar|non recapitabile"
    r"|warning: message .* delayed|delayed mail|message not delivered|could not send message"
    r"|returned to sender|unable to deliver|message delivery failure)",
    re.IGNORECASE,
)
_BOUNCE_BODY = re.compile(
    r"this is the qmail-send program|this message was created automatically by mail delivery"
    r"|the original message was received at|-+ ?transcript of session follows"
    r"|delivery has failed to these recipients or (?:groups|distribution lists)"
    r"|your message (?:to .{1,200}? )?(?:couldn't|could not|wasn't|was not|cannot) (?:be )?deliver"
    r"|delivery to the following recipients? (?:failed|has been delayed)"
    r"|this is the mail system at host|i'm sorry to have to inform you that your message"
    r"|could not be delivered to one or more (?:of its )?recipients"
    r"|(?:message|mail) (?:could not|cannot|can't) be delivered"
    r"|following address(?:es)? had permanent fatal errors|has not yet been delivered"
    r"|the email account that you tried to reach|failed permanently"
    r"|your message did not reach some or all of the intended recipients"
    r"|unable to deliver (?:your )?mess",
    re.IGNORECASE,
)
_DELAY_MARKERS = re.compile(
    r"has not yet been delivered|delivery to the following recipients? has been delayed"
    r"|this is a warning (?:message )?only|will (?:continue to )?(?:be )?retr(?:y|ied)"
    r"|delivery attempts will continue|temporary failure|delivery delayed|message delayed",
    re.IGNORECASE,
)
_ORIGINAL_MARKER = re.compile(
    r"^[ \t]*(?:-{2,}[ \t]*(?:below this line is a copy of the message"
    r"|this is a copy of (?:the (?:body of the )?message|the message's headers)"
    r"|original message|unsent message|returned message|message headers? follows?)"
    r"|original message headers:)",
    re.IGNORECASE | re.MULTILINE,
)
_ADDRESS = r"[^\s<>()\"',;:]+@[^\s<>()\"',;:]+?"
_RECIPIENT_PATTERNS = (
    re.compile(rf"^[ \t]*<({_ADDRESS})>:", re.MULTILINE),  # qmail, Postfix
    re.compile(
        rf"following address(?:\(es\)|es)? failed:[ \t]*\n(?:[ \t]*\n)?"
        rf"[ \t]*<?({_ADDRESS})>?[ \t]*$",
        re.IGNORECASE | re.MULTILINE,
    ),  # Exim
    re.compile(
        rf"permanent fatal errors -*[ \t]*\n[ \t]*<?({_ADDRESS})>?(?=[\s(]|$)", re.IGNORECASE
    ),  # Sendmail
    re.compile(
        rf"delivery to the following recipients? (?:failed permanently|has been delayed):"
        rf"\s*<?({_ADDRESS})>?(?=\s|$)",
        re.IGNORECASE,
    ),  # Gmail (older)
    re.compile(
        rf"delivery has failed to these recipients or (?:groups|distribution lists):\s*"
        rf"(?:[^\n<]*?<?(?:mailto:)?)?({_ADDRESS})>?(?=[\s)]|$)",
        re.IGNORECASE,
    ),  # Exchange
    re.compile(
        rf"your message to\s+<?({_ADDRESS})>?\s+(?:couldn't|could not|wasn't|was not)",
        re.IGNORECASE,
    ),
    re.compile(
        rf"following recipient\(s\) (?:cannot|could not) be reached:\s*^[ \t]*<?({_ADDRESS})>?"
        rf"(?=[\s)]|$)",
        re.IGNORECASE | re.MULTILINE,
    ),  # Exchange 2000 / 2003
    re.compile(rf"<({_ADDRESS})>\.\.\. ", re.IGNORECASE),  # Sendmail transcript
)
_DIAGNOSTIC_PATTERNS = (
    re.compile(
        r"technical details of (?:permanent|temporary) failure:[ \t]*\n?(.+?)(?:\n[ \t]*\n|\Z)",
        re.IGNORECASE | re.DOTALL,
    ),
    re.compile(r"remote server returned '([^'\n]+)'", re.IGNORECASE),
    re.compile(
        r"the (?:response|error) (?:from the remote server )?was:[ \t]*\n+(.+?)(?:\n[ \t]*\n|\Z)",
        re.IGNORECASE | re.DOTALL,
    ),
    re.compile(r"^[ \t]*(#?[45]\d\d[ -][^\n]*)$", re.MULTILINE),
    re.compile(r"^[^\n]*\b[45]\.\d{1,3}\.\d{1,3}\b[^\n]*$", re.MULTILINE),
)
_REMOTE_PATTERNS = (
    re.compile(r"\bremote host\s+([\w.:-]+?)\s+said", re.IGNORECASE),
    re.compile(r"\bhost\s+([A-Za-z0-9][\w-]*(?:\.[\w-]+)+?)\.?\s*\[", re.IGNORECASE),
    re.compile(r"while talking to\s+([\w-]+(?:\.[\w-]+)+?)\.?:", re.IGNORECASE),
    re.compile(r"<([\w-]+(?:\.[\w-]+)+) #[45]\.\d", re.IGNORECASE),  # Exchange 2003
)


def _remote_from_text(text: str) -> str | None:
    for pattern in _REMOTE_PATTERNS:
        found = pattern.search(text)
        if found:
            return found.group(1).rstrip(".").lower()
    return None


def _failed_recipient_header(message: Message) -> str | None:
    for _, address in getaddresses([_header(message, "X-Failed-Recipients")]):
        if "@" in address:
            return address.lower()
    return None


def _addresses_of(message: Message, *names: str) -> set[str]:
    values = [_header(message, name) for name in names]
    return {address.lower() for _, address in getaddresses(values) if address}


def _is_daemon(message: Message) -> bool:
    sender = _header(message, "From")
    for name, address in getaddresses([sender]):
        local = address.rpartition("@")[0] if "@" in address else address
        if _DAEMON_LOCAL.match(local) or _DAEMON_NAME.search(name):
            return True
    return bool(_DAEMON_NAME.search(sender))


def _follow_lines(text: str, start: int, end: int) -> str:
    """The rest of the anchor's line and the lines after it, until a blank line or, for an
    indented anchor (Exim), a line no more indented than it."""
    line_start = text.rfind("\n", 0, start) + 1
    anchor = text[line_start:start]
    indent = len(anchor) - len(anchor.lstrip(" \t"))
    line_end = text.find("\n", end)
    rest = text[end : len(text) if line_end < 0 else line_end].strip(" \t:>")
    pieces = [rest] if rest else []
    if line_end >= 0:
        for line in text[line_end + 1 :].split("\n"):
            if not line.strip():
                break
            if indent and len(line) - len(line.lstrip(" \t")) <= indent:
                break
            pieces.append(line.strip())
    return " ".join(pieces).strip()


def _from_text(message: Message) -> Bounce | None:
    subject = _header(message, "Subject")
    body = _body_text(message)
    marker = _ORIGINAL_MARKER.search(body)
    report = body[: marker.start()] if marker else body
    returned = body[marker.start() :] if marker else ""
    content_type = message.get_content_type()
    is_report = content_type == "multipart/report" and "delivery-status" in str(
        message.get_param("report-type", "") or ""
    )
    score = sum(
        (
            _is_daemon(message),
            bool(_BOUNCE_SUBJECT.search(subject)),
            bool(_BOUNCE_BODY.search(report)) or is_report,
            _header(message, "Return-Path") in ("<>", "<MAILER-DAEMON>"),
        )
    )
    if score < 2 or not (_BOUNCE_SUBJECT.search(subject) or _BOUNCE_BODY.search(report)):
        return None

    ignored = _addresses_of(message, "To", "From", "Return-Path", "Delivered-To")
    recipient = _failed_recipient_header(message)
    anchor: re.Match[str] | None = None
    for pattern in _RECIPIENT_PATTERNS:
        for found in pattern.finditer(report):
            if found.group(1).lower() not in ignored:
                anchor = found
                break
        if anchor:
            break
    if recipient is None and anchor is not None:
        recipient = anchor.group(1).lower()
    if recipient is None:
        for address in re.findall(r"(?<![\w.+'-])[\w.+'-]+@[\w-]+(?:\.[\w-]+)+", report):
            if address.lower() not in ignored and not _DAEMON_LOCAL.match(address.split("@")[0]):
                recipient = address.lower()
                break
    if anchor is not None and recipient is not None and anchor.group(1).lower() != recipient:
        anchor = next(
            (
                found
                for pattern in _RECIPIENT_PATTERNS
                for found in pattern.finditer(report)
                if found.group(1).lower() == recipient
            ),
            None,
        )

    diagnostic = _follow_lines(report, anchor.start(), anchor.end()) if anchor else ""
    if not (_ENHANCED_FAILURE.search(diagnostic) or _BASIC_CODE.search(diagnostic)):
        for pattern in _DIAGNOSTIC_PATTERNS:
            line = pattern.search(report)
            if line:
                diagnostic = re.sub(r"\s*\n\s*", " ", line.group(line.lastindex or 0)).strip()
                break
    diagnostic_or_none = diagnostic or None

    said = _ENHANCED_FAILURE.search(diagnostic) or _ENHANCED_FAILURE.search(report)
    status = said.group(0) if said else None
    delayed = bool(_DELAY_MARKERS.search(report)) or bool(
        re.match(r"\s*(?:warning|delayed)", subject, re.IGNORECASE)
    )
    if status and status.startswith("4"):
        delayed = delayed or not re.search(r"permanent|given up|gave up|failed", report, re.I)
    action = "delayed" if delayed else "failed"
    kind = classify_bounce(action, status, diagnostic or report)
    remote = _remote_from_text(diagnostic) or _remote_from_text(report)
    original = _original_message_id(message, [], returned or body)
    return Bounce(
        kind, status, action, diagnostic_or_none, recipient, original, remote, report.strip()
    )


def _bounce(message: Message) -> Bounce | None:
    from_report = _from_dsn(message)
    if from_report is None or isinstance(from_report, Bounce):
        return from_report
    return _from_text(message)


def parse_bounce(raw: bytes) -> Bounce | None:
    """The bounce a message reports, or None when it is not one.

    A DSN (a message/delivery-status part, RFC 3464) is read first: one Bounce for its first
    recipient whose Action is failed, else for its first delayed one (kind ``delayed``, not
    :attr:`Bounce.final`); a Status of class 5 / 4 stands for a missing Action. A DSN naming
    only delivered / relayed / expanded recipients is not a bounce. Otherwise the message
    counts as a plain-text bounce when two of these hold, one of them being the subject or
    the body: a daemon sender (MAILER-DAEMON, postmaster, Mail Delivery Subsystem...), a
    bounce subject, bounce wording in the body, a null Return-Path; recipient, status and
    diagnostic are then read from the text and the Action is inferred (a delay notice's
    wording makes it ``delayed``).
    """
    message = _parse(raw)
    if message is None:
        return None
    try:
        return _bounce(message)
    except _UNREADABLE:
        return None  # a malformed message is not a bounce we can act on


# --------------------------------------------------------------------------- auto-replies

_REPLY_PREFIX = re.compile(
    r"\b(?:re|aw|sv|antw|wg|fw|fwd|tr|rv|res|rif|vs|odp|ynt)\s?:", re.IGNORECASE
)
_OOO_SUBJECT = re.compile(
    r"out of (?:the )?office|\booo\b|\boof\b|automatic reply|auto[- ]?reply|autoreply"
    r"|auto[- ]?response|automatic response|^\s*auto\s*:|^\s*away\b|on vacation|on leave"
    r"|vacation (?:reply|response|notice)|abwesenheit|nicht im buro|automatische antwort"
    r"|absence du bureau|absent du bureau|reponse automatique|fuera de la oficina"
    r"|respuesta automatica|afwezig|automatisch antwoord|fuori sede|fuori ufficio"
    r"|risposta automatica|ausencia|resposta automatica|franvaro|autosvar|automatisk svar",
    re.IGNORECASE,
)
_OOO_BODY = re.compile(
    r"out of (?:the )?office|away from (?:the|my) (?:office|desk)|currently away|i am away"
    r"|i'm away|on (?:annual |parental |maternity |paternity |sick |business )?leave"
    r"|on (?:vacation|holiday|holidays|a business trip)|annual leave|limited access to"
    r"|\bbe back\b|will return|returning on|\bback in the office|when i(?:'m| am) back"
    r"|(?:upon|on) my return|when i return"
    r"|abwesend|nicht im buro|ausser haus|im urlaub|abwesenheit|wieder erreichbar"
    r"|wieder im buro|elternzeit|dienstreise"
    r"|absente? du bureau|en conges?\b|en vacances|\babsente?\b|de retour"
    r"|fuera de la oficina|de vacaciones|\bausente\b|de vuelta|estare fuera"
    r"|niet op kantoor|met vakantie|\bafwezig\b|weer aanwezig"
    r"|fuori sede|fuori ufficio|in ferie|\bassente\b"
    r"|fora do escritorio|de ferias|ausencia"
    r"|franvarande|franvaro|pa semester|\bledig\b|tillbaka",
    re.IGNORECASE,
)
_ACKNOWLEDGEMENT = re.compile(
    r"(?:we have|we've|has been|have been|was|is) (?:successfully )?received"
    r"|we received your|(?:ticket|case|request|reference|incident)\s*(?:number|no\.?|#|id\b)"
    r"|\[(?:ticket|case|request)\s*#|this is an automated (?:response|reply|message|email)"
    r"|thank you for (?:contacting|reaching out|your (?:request|inquiry|enquiry|message))"
    r"|has been (?:logged|created|assigned)|we will (?:get back|respond|reply) to you"
    r"|do not reply to this|wir haben ihre (?:nachricht|anfrage|e-?mail) erhalten"
    r"|ihre anfrage|nous avons bien recu|hemos recibido|abbiamo ricevuto|recebemos"
    r"|vi har mottagit|wij hebben uw",
    re.IGNORECASE,
)
_AUTO_HEADERS = ("X-Autoreply", "X-Autorespond", "X-Autoresponder", "X-Auto-Reply")


def _subject_head(subject: str) -> str:
    """The subject before the first reply prefix: "Automatic reply: Re: X" keeps its
    marker, "Re: Out of office software" (a person answering us) does not."""
    return _REPLY_PREFIX.split(_fold(subject), maxsplit=1)[0]


def _auto_reply(message: Message, received_at: datetime) -> AutoReply | None:
    keyword = re.match(r"\s*([\w-]+)", _header(message, "Auto-Submitted"))
    submitted = keyword.group(1).lower() if keyword else ""
    if submitted == "no":
        return None  # RFC 3834: a person sent it
    if _bounce(message) is not None:
        return None
    precedence = {_header(message, name).strip().lower() for name in ("Precedence", "X-Precedence")}
    subject_head = _subject_head(_header(message, "Subject"))
    text = _reply_text_of(message)
    folded = _fold(text)
    ooo_subject = bool(_OOO_SUBJECT.search(subject_head))
    ooo_body = bool(_OOO_BODY.search(folded))
    by_header = (
        bool(submitted)
        or any(message.get(name) is not None for name in _AUTO_HEADERS)
        or "auto_reply" in precedence
        or "autoresponder" in _header(message, "X-POST-MessageClass").lower()
        or _header(message, "Delivered-To").lower() == "autoresponder"
    )
    bulk_ooo = bool(precedence & {"bulk", "junk", "list"}) and (ooo_subject or ooo_body)
    if not (by_header or ooo_subject or bulk_ooo):
        return None
    language = _header(message, "Content-Language") or None
    returning = parse_return_date(text, received_at=received_at, language=language)
    if ooo_body:
        return AutoReply("out_of_office", returning)
    if _ACKNOWLEDGEMENT.search(folded) or _ACKNOWLEDGEMENT.search(subject_head):
        return AutoReply("auto_reply", None)  # "we will get back to you by ...": not a return
    if returning is not None or ooo_subject:
        return AutoReply("out_of_office", returning)
    return AutoReply("auto_reply", None)


def classify_auto_reply(raw: bytes, *, received_at: datetime) -> AutoReply | None:
    """An automatic reply (RFC 3834), or None for a message a person wrote.

    Automatic: an Auto-Submitted other than "no" (a "no" settles it: a person), X-Autoreply /
    X-Autorespond, Precedence: auto_reply, or an out-of-office / automatic-reply subject
    (before any "Re:"); Precedence bulk / junk / list only with out-of-office wording.
    X-Auto-Response-Suppress and X-MS-Exchange-Inbox-Rules-Loop alone do not count (they
    ask others not to answer / count rule hops, forwarded mail carries them too). Bounces are
    not automatic replies here (see :func:`parse_bounce`).

    Kind: out_of_office when the text has absence wording; otherwise auto_reply for
    acknowledgements ("we have received your request", ticket numbers); otherwise
    out_of_office when a return date is stated or the subject is an out-of-office /
    "Automatic reply" one; auto_reply for the rest.
    """
    message = _parse(raw)
    if message is None:
        return None
    try:
        return _auto_reply(message, received_at)
    except _UNREADABLE:
        return None


# --------------------------------------------------------------------------- return dates

_MONTH_NAMES = (
    "january jan januar janner janv janvier enero ene januari gennaio gen janeiro",
    "february feb februar fevrier fevr febrero februari febbraio fevereiro fev",
    "march mar marz maerz mars marzo maart mrt marco",
    "april apr avril avr abril aprile abr",
    "may mai mayo mei maggio mag maio maj",
    "june jun juni juin junio giugno giu junho",
    "july jul juli juillet juil julio luglio lug julho",
    "august aug aout agosto ago augustus augusti",
    "september sep sept septembre septiembre setiembre settembre sett setembro",
    "october oct oktober okt octobre octubre ottobre ott outubro",
    "november nov novembre noviembre novembro",
    "december dec dezember dez decembre diciembre dic dicembre dezembro",
)
_MONTHS = {
    name: number for number, names in enumerate(_MONTH_NAMES, start=1) for name in names.split()
}
_MONTH = "|".join(sorted(_MONTHS, key=len, reverse=True))
_DATE_PATTERNS = (
    # 2026-12-01, 2026/12/01
    ("ymd", re.compile(r"(?<![\d.])(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?![\d])")),
    # 03/12/2026, 3.12.2026, 03-12-26
    ("numeric", re.compile(r"(?<![\d./])(\d{1,2})([./-])(\d{1,2})\2(\d{4}|\d{2})(?![\d])")),
    # 3 December [2026], 3. Dezember, 3rd of March, 3 de diciembre de 2026, 1er décembre
    (
        "dm",
        re.compile(
            rf"(?<![\d])(\d{{1,2}})(?:st|nd|rd|th|er|eme|e|o|º|°)?\.?[ \t-]*(?:(?:de|of)\s+)?"
            rf"(?<![a-z])({_MONTH})(?![a-z])\.?(?:[ \t,-]*(?:de\s+)?(\d{{4}}))?(?![\d])"
        ),
    ),
    # December 3[, 2026], Dec. 3rd
    (
        "md",
        re.compile(
            rf"(?<![a-z])({_MONTH})(?![a-z])\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?(?![\d:])"
            rf"(?:,?\s*(\d{{4}}))?(?![\d])"
        ),
    ),
    # 7.12. / 3/12 (no year: only next to a return phrase)
    ("short", re.compile(r"(?<![\d./])(\d{1,2})([./])(\d{1,2})\.?(?![\d/]|\.\d)")),
)
_STRONG_BEFORE = re.compile(
    r"\b(?:back|return(?:ing|s)?|be in the office|in the office (?:again|from|on)"
    r"|available again|reachable again|zuruck|wieder|retour|de vuelta|vuelvo|volvere"
    r"|regres\w*|reincorpor\w*|terug|weer|rientr\w*|ritorno|de volta|volto|retorno"
    r"|retornarei|regressarei|regresso|tillbaka|ater)\b"
)
_WEAK_BEFORE = re.compile(
    r"\b(?:until|till|thru|through|bis|jusqu|hasta|fino|ate|tot|t\.?o\.?m\.?)\b"
)
_STRONG_AFTER = re.compile(r"^[\s,.]*(?:\S+\s+){0,3}?(?:wieder|zuruck|terug|tillbaka)\b")
_ENGLISH = re.compile(
    r"\b(?:the|and|you|your|will|be|i|am|thank|thanks|with|office|back|until|my)\b"
)
_OTHER = re.compile(
    r"\b(?:und|ich|sie|nicht|vielen|dank|wieder|bin|je|vous|suis|merci|votre|jusqu|estare"
    r"|gracias|hasta|usted|ik|ben|niet|bedankt|sono|grazie|fino|estou|obrigad[oa]|jag|och"
    r"|tack|inte|der|die|das|le|la|el|los|het|il|di|pa)\b"
)


def _month_first(text: str, language: str | None) -> bool:
    """Numeric dates are month-first only for US English: Content-Language "en" or "en-US",
    or, without it, text that reads as English. Everything else is day-first."""
    if language:
        tag = language.split(",")[0].strip().lower().replace("_", "-")
        return tag in ("en", "en-us")
    return len(_ENGLISH.findall(text)) > len(_OTHER.findall(text))


#: A year-less date this much before the reception is that past date, not next year's.
_RECENTLY_PASSED = timedelta(days=60)


def _make_date(year: int | None, month: int, day: int, received: date) -> date | None:
    if not (1 <= month <= 12 and 1 <= day <= 31):
        return None
    if year is not None:
        if year < 100:
            year += 2000
        try:
            return date(year, month, day)
        except ValueError:
            return None
    for candidate_year in range(received.year, received.year + 5):
        try:
            candidate = date(candidate_year, month, day)
        except ValueError:
            continue  # 29 February of a common year
        if candidate >= received:
            return candidate
        if received - candidate <= _RECENTLY_PASSED:
            return candidate  # a stale notice ("back on December 4", read on the 10th)
    return None


@dataclass(frozen=True, slots=True)
class _Found:
    start: int
    end: int
    value: date
    needs_anchor: bool


def _dates_in(folded: str, received: date, month_first: bool) -> list[_Found]:
    found: list[_Found] = []
    for form, pattern in _DATE_PATTERNS:
        for match in pattern.finditer(folded):
            groups = match.groups()
            value: date | None
            if form == "ymd":
                value = _make_date(int(groups[0]), int(groups[1]), int(groups[2]), received)
            elif form == "numeric" or form == "short":
                first, second = int(groups[0]), int(groups[2])
                year = int(groups[3]) if form == "numeric" else None
                day, month = first, second
                if groups[1] != ".":  # dotted dates are day-first everywhere
                    if month_first:
                        day, month = second, first
                    if month > 12 >= day:  # unambiguous the other way round
                        day, month = month, day
                value = _make_date(year, month, day, received)
            elif form == "dm":
                year = int(groups[2]) if groups[2] else None
                value = _make_date(year, _MONTHS[groups[1]], int(groups[0]), received)
            else:
                year = int(groups[2]) if groups[2] else None
                value = _make_date(year, _MONTHS[groups[0]], int(groups[1]), received)
            if value is not None:
                found.append(_Found(match.start(), match.end(), value, form == "short"))
    found.sort(key=lambda f: (f.start, -(f.end - f.start)))
    kept: list[_Found] = []
    for item in found:
        if kept and item.start < kept[-1].end:
            continue  # overlaps a longer or earlier reading
        kept.append(item)
    return kept


def parse_return_date(
    text: str, *, received_at: datetime, language: str | None = None
) -> date | None:
    """The return date an out-of-office text states, or None.

    Dates: ISO (2026-12-01), numeric (03/12/2026, 3.12.2026; dotted is always day-first,
    slashed / dashed is month-first for US English and day-first otherwise, see
    :func:`_month_first`; a part over 12 settles it), day-month and month-day with month
    names in English, German, French, Spanish, Dutch, Italian, Portuguese and Swedish,
    optional year. A date without a year is the next such date on or after ``received_at``,
    unless it fell in the 60 days before (a stale notice: that past date); dates before
    ``received_at``'s day, or more than two years after it, are ignored.

    Choice: a date right after a return phrase ("back on", "returning", "zurück am", "de
    retour le", "de vuelta el", ...) or right before a German / Dutch / Swedish one ("ab dem 7.
    Dezember wieder") wins; then one after "until" ("bis", "jusqu'au", "hasta", ...; taken as
    the return date itself); then the latest date. Weekday-only and month-only phrases are
    not read; year-less numeric dates (7.12.) count only next to such a phrase.
    """
    received = received_at.date()
    folded = _fold(text)
    found = [
        f
        for f in _dates_in(folded, received, _month_first(folded, language))
        if received <= f.value <= received + timedelta(days=730)
    ]
    strong: list[_Found] = []
    weak: list[_Found] = []
    loose: list[_Found] = []
    previous_end = 0
    for index, item in enumerate(found):
        before = folded[max(previous_end, item.start - 60) : item.start]
        next_start = found[index + 1].start if index + 1 < len(found) else len(folded)
        after = folded[item.end : min(next_start, item.end + 40)]
        previous_end = item.end
        if _STRONG_BEFORE.search(before) or _STRONG_AFTER.search(after):
            strong.append(item)
        elif _WEAK_BEFORE.search(before):
            weak.append(item)
        elif not item.needs_anchor:
            loose.append(item)
    if strong:
        return strong[0].value
    if weak:
        return weak[0].value
    if loose:
        return max(f.value for f in loose)
    return None


# --------------------------------------------------------------------------- reply text

_ATTRIBUTION = re.compile(
    r"^[ \t]*(?:on|am|le|el|op|il|em|den|pa|w dniu)\b.{0,400}?"
    r"(?:wrote|schrieb|a ecrit|escribio|schreef|ha scritto|escreveu|skrev|napisal)\b[^:]{0,200}:"
    r"[ \t]*$",
    re.IGNORECASE | re.DOTALL,
)
_ATTRIBUTION_START = re.compile(r"[ \t]*(?:on|am|le|el|op|il|em|den|pa|w dniu)\b")
_SEPARATOR = re.compile(
    r"^[ \t]*-{2,}[ \t]*(?:original message|ursprungliche nachricht|originalnachricht"
    r"|message d'origine|mensaje original|oorspronkelijk bericht|messaggio originale"
    r"|mensagem original|ursprungligt meddelande|forwarded message|weitergeleitete nachricht"
    r"|message transfere)[ \t]*-{2,}",
    re.IGNORECASE,
)
_HEADER_FROM = re.compile(r"^[ \t]*\*?(?:from|von|de|van|da|fran|fra|od)[ \t]*:\*?[ \t]*\S", re.I)
_HEADER_NEXT = re.compile(
    r"^[ \t]*\*?(?:sent|gesendet|envoye|enviado(?: el)?|verzonden|inviato|skickat|sendt|date"
    r"|datum|fecha|data|wyslano|to|an|a|para|aan|cc|subject|betreff|objet|asunto)[ \t]*:",
    re.IGNORECASE,
)
_SIGNATURE = re.compile(
    r"^[ \t]*(?:--[ \t]*$|sent from my |sent from outlook|get outlook for |von meinem .* gesendet"
    r"|envoye de mon |enviado desde mi |verzonden (?:vanaf|met) |inviato da |skickat fran )",
    re.IGNORECASE,
)


def _strip_quoted(text: str) -> str:
    """The new text of a reply: cut at the first attribution line ("On ... wrote:"), the
    first "-----Original Message-----" or Outlook header block ("From: / Sent:", "Von: /
    Gesendet:"); lines quoted with ">" dropped; the signature ("-- ", "Sent from my
    iPhone") dropped."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    folded = [_fold(line) for line in lines]
    cut = len(lines)
    for index, line in enumerate(folded):
        if _SEPARATOR.match(line):
            cut = index
            break
        if _HEADER_FROM.match(line) and any(
            _HEADER_NEXT.match(following) for following in folded[index + 1 : index + 5]
        ):
            cut = index
            break
        if _ATTRIBUTION_START.match(line) and any(
            _ATTRIBUTION.match(" ".join(folded[index : index + size])) for size in (1, 2, 3)
        ):
            cut = index
            break
    kept: list[str] = []
    for line, low in zip(lines[:cut], folded[:cut], strict=True):
        if _SIGNATURE.match(low):
            break
        if line.lstrip().startswith(">"):
            continue
        kept.append(line.rstrip())
    while kept and (not kept[-1].strip() or re.fullmatch(r"[ \t_\-=*]+", kept[-1])):
        kept.pop()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


def _reply_text_of(message: Message) -> str:
    return _strip_quoted(_body_text(message))


def reply_text(raw: bytes) -> str:
    """What the person wrote: the text/plain part (or the HTML part as text), without the
    quoted history and the signature. "" when there is none."""
    message = _parse(raw)
    if message is None:
        return ""
    try:
        return _reply_text_of(message)
    except _UNREADABLE:
        return ""


# --------------------------------------------------------------------------- unsubscribe

#: (pattern, negatable): a negatable request is ignored right after "don't", "not", ...
_UNSUBSCRIBE: tuple[tuple[re.Pattern[str], bool], ...] = tuple(
    (re.compile(pattern), negatable)
    for pattern, negatable in (
        # English
        (r"\bunsubscrib\w*", True),
        (
            r"\bremove\s+(?:me|us|myself|my\s+(?:e-?mail(?:\s+address)?|address|name|details"
            r"|contact(?:\s+details)?|data)|this\s+(?:e-?mail|address))\b",
            True,
        ),
        (r"\btake\s+(?:me|us|my\s+(?:e-?mail|address|name)(?:\s+address)?)\s+off\b", True),
        (r"\boff\s+(?:of\s+)?(?:your|the)\s+(?:mailing\s+|e-?mail\s+|contact\s+)?list\b", True),
        (
            r"\b(?:stop|quit|cease)\s+(?:e-?mailing|mailing|sending|contacting|messaging"
            r"|writing|spamming)\b",
            True,
        ),
        (r"\bplease\s+stop\b(?!\s+(?:by|in|over|at|for))", False),
        (r"\bno\s+more\s+(?:e-?mails|mails|messages|emails)\b", False),
        (
            r"\b(?:do\s+not|don't|dont|never)\s+(?:e-?mail|contact|write\s+to|message|send\s+me)"
            r"\s*(?:me|us)?\s*(?:again|anymore|any\s+more)?\b",
            False,
        ),
        (r"\bopt(?:-|\s)?(?:me\s+)?out\b", True),
        (r"\bnot\s+interested\b[^.!?\n]{0,40}\b(?:remove|delete|list)\b", False),
        (r"\b(?:delete|erase)\s+(?:me|my\s+(?:e-?mail|address|data|details))\b", True),
        (r"\bleave\s+me\s+alone\b", False),
        (r"\A\W*(?:stop|remove|remove me|unsubscribe|no more)\W*\Z", False),
        # German
        (r"\babmeld\w*|\babzumelden\b|\bmelden\s+sie\s+mich\b[^.!?\n]{0,40}\bab\b", True),
        (r"\babbestell\w*|\babzubestellen\b", True),
        (r"\baustragen\b|\bauszutragen\b|\bausgetragen\b", True),
        (r"\btragen\s+sie\s+mich\b[^.!?\n]{0,60}\baus\b", True),
        (r"\bkeine\s+(?:weiteren\s+)?(?:e-?mails|mails|nachrichten|werbung|newsletter)\b", False),
        (
            r"\b(?:entfernen|loschen|streichen)\s+sie\s+(?:mich|meine\s+(?:e-?mail\w*|adresse"
            r"|daten|kontaktdaten))\b",
            True,
        ),
        (r"\bnicht\s+mehr\s+(?:zu\s+)?(?:kontaktieren|anschreiben|schreiben)\b", False),
        # French
        (r"\bdesabonn\w*|\bdesinscri\w*", True),
        (r"\b(?:retirez|supprimez|enlevez|effacez|rayez)[- ]moi\b", True),
        (r"\bne\s+plus\s+(?:me\s+)?(?:recevoir|contacter|ecrire|envoyer)\b", False),
        (r"\bne\s+me\s+(?:contactez|ecrivez|envoyez)\s+plus\b", False),
        (r"\barretez\s+de\s+m'?\s*(?:envoyer|ecrire|contacter|solliciter)\b", False),
        # Spanish
        (r"\b(?:dar|darme|darnos|dadme|denme|deme)\s+de\s+baja\b", True),
        (r"\bbaja\s+de\s+(?:la|su|sus|vuestra)\s+lista\b", True),
        (r"\bno\s+(?:quiero|deseo)\s+(?:seguir\s+)?recibir\b", False),
        (r"\bdejen?\s+de\s+(?:enviar|escribir|contactar)\w*\b", False),
        (
            r"\b(?:eliminen|eliminar|borrar|borren|quitar|quiten|saquen|sacar)(?:me)?\s+de\s+"
            r"(?:su|la|sus|vuestra)\s+(?:lista|base)",
            True,
        ),
        (r"\beliminame\b|\beliminenme\b|\bborrenme\b|\bquitenme\b", True),
        (r"\bno\s+me\s+(?:envien|escriban|contacten)\s+mas\b", False),
        # Dutch, Italian, Portuguese
        (r"\bafmeld\w*|\buitschrijv\w*|\bschrijf\s+(?:mij|me)\s+uit\b", True),
        (r"\bdisiscriv\w*|\bcancellami\b|\brimuovetemi\b|\brimuovermi\b", True),
        (r"\bdescadastr\w*|\bcancelar\s+(?:a\s+)?(?:minha\s+)?inscricao\b", True),
    )
)
_NEGATION = re.compile(
    r"\b(?:don't|dont|do\s+not|not|never|no\s+need\s+to|nicht|kein\w*|ne\s+pas|no)"
    r"\s+(?:\w+\s+){0,2}$"
)


def wants_unsubscribe(text: str) -> bool:
    """Whether a reply asks to be removed. Only its new text counts: the quoted original
    (with our own "Unsubscribe" footer) and the signature are cut off first, as in
    :func:`reply_text`; "please don't unsubscribe me" is not a request."""
    folded = _fold(_strip_quoted(text))
    for pattern, negatable in _UNSUBSCRIBE:
        for found in pattern.finditer(folded):
            if negatable and _NEGATION.search(folded[max(0, found.start() - 30) : found.start()]):
                continue
            return True
    return False
