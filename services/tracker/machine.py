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
#: A click this soon after delivery (the hand-off, or the provider's delivery report when
#: that came later) was a scanner: gateways follow the links as the message arrives.
CLICK_TOO_SOON = timedelta(seconds=10)
#: Several distinct links clicked within this span of each other: a scanner walking the
#: links. (The same link twice is a person double-clicking, not a burst.)
CLICK_BURST = timedelta(seconds=2)
BURST_REASON = "several links clicked at once"


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
    other_links_nearby: int = 0,
    delivered_at: datetime | None = None,
) -> Verdict:
    """``other_links_nearby``: distinct other links of the message clicked within
    :data:`CLICK_BURST` of this click; ``delivered_at``: when a provider reported the
    message delivered, if it did."""
    agent = (user_agent or "").strip()
    if method.upper() == "HEAD":
        return Verdict(True, "HEAD request: a link checker")
    if not agent:
        return Verdict(True, "no user agent")
    if _SCANNER_AGENTS.search(agent):
        return Verdict(True, f"security scanner: {agent[:60]}")
    arrived = max((t for t in (sent_at, delivered_at) if t is not None), default=None)
    if arrived is not None and at - arrived < CLICK_TOO_SOON:
        return Verdict(True, "clicked right after delivery")
    if other_links_nearby >= 1:
        return Verdict(True, BURST_REASON)
    return HUMAN


def provider_open_is_machine(detail: dict[str, object]) -> bool:
    """Providers that flag machine opens themselves (SendGrid ``sg_machine_open``,
    Mailgun/Postmark Apple MPP hints)."""
    for key in ("sg_machine_open", "machine_open", "is_machine_open"):
        if detail.get(key) in (True, "true", 1):
            return True
    agent = str(detail.get("useragent") or detail.get("user_agent") or "")
    return bool(agent) and (_BARE_MOZILLA.match(agent) is not None)
