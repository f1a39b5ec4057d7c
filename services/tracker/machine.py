"""Telling machines from people: privacy proxies that fetch every image (Apple Mail
Privacy Protection), and security scanners that follow every link. A flagged open
or click is recorded, but ``if_opened``/``if_clicked`` and the "human" analytics
ignore it."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

#: Apple's network: Mail Privacy Protection fetches from here, with a bare UA.
_APPLE_NETWORKS = (ipaddress.ip_network("17.0.0.0/8"),)
_BARE_MOZILLA = re.compile(r"^Mozilla/5\.0\s*$")

#: Link scanners and prefetchers that announce themselves.
_SCANNER_AGENTS = re.compile(
    r"barracuda|mimecast|proofpoint|ppops|forcepoint|symantec|messagelabs|trendmicro|"
    r"sophos|fireeye|cisco.*ironport|ironport|zscaler|safelinks|microsoft office protocol"
    r"|bitdefender|checkpoint|avanan|abnormal|agari|mailguard|spamtitan|fortinet|fortiguard|"
    r"bot\b|crawler|spider|headlesschrome|python-requests|python-httpx|curl/|wget/|go-http"
    r"|java/|okhttp|libwww|scrapy|phantomjs|yahoomailproxy.*prefetch",
    re.IGNORECASE,
)

#: An open this soon after the hand-off was not a person reading.
OPEN_TOO_SOON = timedelta(seconds=2)
#: A click this soon after the hand-off was a scanner.
CLICK_TOO_SOON = timedelta(seconds=10)
#: Several links clicked within this span: a scanner walking the links.
CLICK_BURST = timedelta(seconds=2)


@dataclass(frozen=True, slots=True)
class Verdict:
    machine: bool
    reason: str | None = None


HUMAN = Verdict(False)


def _ip(value: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not value:
        return None
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        return None


def classify_open(
    *, user_agent: str | None, ip: str | None, sent_at: datetime | None, at: datetime
) -> Verdict:
    agent = (user_agent or "").strip()
    address = _ip(ip)
    if address is not None and any(address in net for net in _APPLE_NETWORKS):
        return Verdict(True, "Apple Mail Privacy Protection (Apple network)")
    if _BARE_MOZILLA.match(agent):
        return Verdict(True, "Apple Mail Privacy Protection (bare user agent)")
    if agent and _SCANNER_AGENTS.search(agent):
        return Verdict(True, f"automated agent: {agent[:60]}")
    if sent_at is not None and at - sent_at < OPEN_TOO_SOON:
        return Verdict(True, "opened right after delivery")
    return HUMAN


def classify_click(
    *,
    user_agent: str | None,
    ip: str | None,
    sent_at: datetime | None,
    at: datetime,
    method: str = "GET",
    clicks_just_before: int = 0,
) -> Verdict:
    agent = (user_agent or "").strip()
    if method.upper() == "HEAD":
        return Verdict(True, "HEAD request: a link checker")
    if not agent:
        return Verdict(True, "no user agent")
    if _SCANNER_AGENTS.search(agent):
        return Verdict(True, f"security scanner: {agent[:60]}")
    if sent_at is not None and at - sent_at < CLICK_TOO_SOON:
        return Verdict(True, "clicked right after delivery")
    if clicks_just_before >= 1:
        return Verdict(True, "several links clicked at once")
    return HUMAN


def provider_open_is_machine(detail: dict[str, object]) -> bool:
    """Providers that flag machine opens themselves (SendGrid ``sg_machine_open``,
    Mailgun/Postmark Apple MPP hints)."""
    for key in ("sg_machine_open", "machine_open", "is_machine_open"):
        if detail.get(key) in (True, "true", 1):
            return True
    agent = str(detail.get("useragent") or detail.get("user_agent") or "")
    return bool(agent) and (_BARE_MOZILLA.match(agent) is not None)
