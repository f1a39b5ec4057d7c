"""Inbound mail classification (services/tracker/mailparse.py) on real-world formats."""

from __future__ import annotations

import email
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.tracker.mailparse import (
    AutoReply,
    Bounce,
    classify_auto_reply,
    classify_bounce,
    parse_bounce,
    parse_return_date,
    reply_text,
    wants_unsubscribe,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mail"
RECEIVED = datetime(2026, 11, 30, 10, 5, tzinfo=UTC)


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def plain_body(raw: bytes) -> str:
    """The whole text/plain part, quoted history included."""
    message = email.message_from_bytes(raw)
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode(part.get_content_charset() or "utf-8")
    raise AssertionError("no text/plain part")


# --------------------------------------------------------------------------- bounces

# file, kind, status, action, recipient, original Message-ID, remote MTA, diagnostic
BOUNCES = [
    (
        "rfc3464-simple-dsn.eml",
        "soft",  # failed after 5 days of 4.0.0 timeouts: the address itself is not known bad
        "4.0.0",
        "failed",
        "louisl@larry.slumber.pa.us",
        "<199407022110.RAA02931@CS.UTK.EDU>",
        None,
        "smtp; 426 connection timed out",
    ),
    (
        "rfc3464-multi-recipient.eml",
        "hard",
        "5.0.0",
        "failed",
        "arathib@vnet.ibm.com",  # the first failed recipient of three
        None,  # "[original message goes here]"
        "vnet.ibm.com",
        "smtp;  550 'arathib@vnet.IBM.COM' is not a registered gateway user",
    ),
    (
        "rfc3464-delayed.eml",
        "delayed",  # a delay notice: the MTA keeps trying; not a bounce
        "4.0.0",
        "delayed",
        "thomas@de-montfort.ac.uk",
        None,
        None,
        None,
    ),
    (
        "postfix-5.1.1-user-unknown.eml",
        "hard",
        "5.1.1",
        "failed",
        "jane.doe@example.org",  # Original-Recipient "Jane.Doe@example.org", lower-cased
        "<9c1f6a2b4d8e0f3a5b7c9d1e2f4a6b8c0d2e4f6a@acme.example.com>",  # text/rfc822-headers
        "mx1.example.org",
        "smtp; 550 5.1.1 <jane.doe@example.org>: Recipient address rejected: User unknown"
        " in virtual mailbox table",
    ),
    (
        "gmail-5.1.1-does-not-exist.eml",
        "hard",
        "5.1.1",
        "failed",
        "no.such.person.4821@gmail.com",
        "<d4735e3a265e16eee03f59718b9b5d03019c07d8@acme.example.com>",
        "gmail-smtp-in.l.google.com",
        "smtp; 550-5.1.1 The email account that you tried to reach does not exist. Please try"
        " 550-5.1.1 double-checking the recipient's email address for typos or 550-5.1.1"
        " unnecessary spaces. For more information, go to 550 5.1.1 "
        " https://support.google.com/mail/?p=NoSuchUser"
        " 41be03b00d2f7-2ee3a1b2c3dsi1234567a12.412 - gsmtp",
    ),
    (
        "office365-5.1.10-recipient-not-found.eml",
        "hard",
        "5.1.10",
        "failed",
        "m.mueller@example.org",
        "<0b918943df0962bc7a1824c0555a389347b4febd@acme.example.com>",
        None,
        "smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient m.mueller@example.org"
        " not found by SMTP address lookup",
    ),
    (
        "office365-5.4.1-access-denied.eml",
        "hard",  # Exchange Online Directory-Based Edge Blocking: no such recipient
        "5.4.1",
        "failed",
        "p.nowak@example.com",
        "<2b7e151628aed2a6abf7158809cf4f3c762e7160@acme.example.com>",
        "example-com.mail.protection.outlook.com",
        "smtp; 550 5.4.1 Recipient address rejected: Access denied. For more information see"
        " https://aka.ms/EXOSmtpErrors [AM4PEPF00027A5F.eurprd04.prod.outlook.com"
        " 2026-11-30T10:05:40.912Z 08DD0B6F8E2A1C3B]",
    ),
    (
        "mailbox-full-5.2.2.eml",
        "soft",
        "5.2.2",
        "failed",
        "maria.garcia@example.net",
        "<4e07408562bedb8b60ce05c1decfe3ad16b72230@acme.example.com>",
        None,
        "smtp;552 5.2.2 <maria.garcia@example.net>... Mailbox Full",
    ),
    (
        "office365-delayed-4.4.7.eml",
        "delayed",
        "4.4.7",
        "delayed",
        "sofia.rossi@example.com",
        "<1f3a5c7e9b0d2f4a6c8e0a2c4e6a8c0e2a4c6e8a@acme.example.com>",
        "mx.example.com",
        "smtp;400 4.4.7 Message delayed",
    ),
    (
        "spam-block-5.7.1.eml",
        "policy",
        "5.7.1",
        "failed",
        "buyer@example.net",
        "<6bc1bee22e409f96e93d7e117393172aae2d8a57@acme.example.com>",
        "mx.example.net",
        "smtp; 554 5.7.1 Service unavailable; Client host [203.0.113.45] blocked using"
        " zen.spamhaus.org; https://www.spamhaus.org/query/ip/203.0.113.45",
    ),
    (
        "dmarc-5.7.26.eml",
        "policy",
        "5.7.26",
        "failed",
        "chris.lee@gmail.com",
        "<e3b0c44298fc1c149afbf4c8996fb92427ae41e4@acme.example.com>",
        "gmail-smtp-in.l.google.com",
        "smtp; 550-5.7.26 Unauthenticated email from acme.example.com is not accepted due to"
        " 550-5.7.26 domain's DMARC policy. Please contact the administrator of 550-5.7.26"
        " acme.example.com domain if this was a legitimate mail. To learn about 550-5.7.26"
        " the DMARC initiative, go to 550 5.7.26  https://support.google.com/mail/"
        "?p=DmarcRejection d2e1a72fcca58-7fe4b2a3c1dsi1234567b3a.412 - gsmtp",
    ),
    (
        "exim-nonstandard.eml",
        "hard",
        "5.1.1",
        "failed",
        "o.brown@example.org",
        "<ef2d127de37b942baad06145e54b0c619a1f22327b2ebbcfbec78f5564afe39d@acme.example.com>",
        "mail.example.org",
        "SMTP error from remote mail server after RCPT TO:<o.brown@example.org>: host"
        " mail.example.org [192.0.2.153]: 550 5.1.1 <o.brown@example.org>: Recipient address"
        " rejected: User unknown",
    ),
    (
        "qmail-nonstandard.eml",
        "hard",
        "5.5.0",
        "failed",
        "tom.white@example.com",
        "<4b227777d4dd1fc61c6f884f48641d02b4d121d3@acme.example.com>",
        "192.0.2.32",
        "Sorry, no SMTP connection got far enough; most progress was RCPT TO response; remote"
        " host 192.0.2.32 said: 550 Unknown user tom.white@example.com . (#5.5.0) (Other MXes"
        " tried: 192.0.2.40 said 550 for RCPT TO response.)",
    ),
    (
        "sendmail-returned-mail.eml",
        "hard",
        "5.1.1",
        "failed",
        "p.smith@example.net",
        "<ef2d127de37b942baad06145e54b0c619a1f2232@acme.example.com>",
        "store.example.net",
        "(reason: 550 5.1.1 <p.smith@example.net>... User unknown)",
    ),
]

DSN_FIXTURES = {row[0] for row in BOUNCES} - {
    "exim-nonstandard.eml",
    "qmail-nonstandard.eml",
    "sendmail-returned-mail.eml",
}


@pytest.mark.parametrize(
    ("name", "kind", "status", "action", "recipient", "original", "remote", "diagnostic"),
    BOUNCES,
    ids=[row[0] for row in BOUNCES],
)
def test_bounce_fixtures(
    name: str,
    kind: str,
    status: str | None,
    action: str,
    recipient: str,
    original: str | None,
    remote: str | None,
    diagnostic: str | None,
) -> None:
    bounce = parse_bounce(fixture(name))
    assert isinstance(bounce, Bounce)
    assert bounce.kind == kind
    assert bounce.status == status
    assert bounce.action == action
    assert bounce.recipient == recipient
    assert bounce.original_message_id == original
    assert bounce.remote_mta == remote
    assert bounce.diagnostic == diagnostic
    assert classify_auto_reply(fixture(name), received_at=RECEIVED) is None


@pytest.mark.parametrize("name", sorted(DSN_FIXTURES))
def test_a_dsn_keeps_its_machine_readable_report_raw(name: str) -> None:
    bounce = parse_bounce(fixture(name))
    assert bounce is not None
    assert bounce.raw_report.lstrip().startswith("Reporting-MTA:")
    assert "Final-Recipient:" in bounce.raw_report
    assert bounce.raw_report in fixture(name).decode().replace("\r\n", "\n")


def test_the_multi_recipient_report_is_kept_whole() -> None:
    bounce = parse_bounce(fixture("rfc3464-multi-recipient.eml"))
    assert bounce is not None
    assert "wsnell@sdcc13.ucsd.edu" in bounce.raw_report
    assert "Status: 4.0.0 (hpnjld.njd.jp.com: host name lookup failure)" in bounce.raw_report
    assert "Diagnostic-Code: smtp;  550 'arathib@vnet.IBM.COM' is not a\n" in bounce.raw_report


@pytest.mark.parametrize(
    ("name", "starts", "absent"),
    [
        ("exim-nonstandard.eml", "This message was created automatically", "Hi Olivia"),
        ("qmail-nonstandard.eml", "Hi. This is the qmail-send program", "Hi Tom"),
        ("sendmail-returned-mail.eml", "The original message was received", "Hi Paul"),
    ],
)
def test_a_plain_bounce_keeps_its_human_text_without_the_returned_message(
    name: str, starts: str, absent: str
) -> None:
    bounce = parse_bounce(fixture(name))
    assert bounce is not None
    assert bounce.raw_report.startswith(starts)
    assert absent not in bounce.raw_report


@pytest.mark.parametrize(
    "name", ["rfc3464-delayed.eml", "office365-delayed-4.4.7.eml"], ids=["rfc3464", "office365"]
)
def test_a_delay_notice_is_not_a_final_failure(name: str) -> None:
    bounce = parse_bounce(fixture(name))
    assert bounce is not None
    assert not bounce.final and bounce.kind == "delayed" and bounce.action == "delayed"


def test_final_failures_are_final() -> None:
    for name in (
        "rfc3464-simple-dsn.eml",
        "postfix-5.1.1-user-unknown.eml",
        "exim-nonstandard.eml",
    ):
        bounce = parse_bounce(fixture(name))
        assert bounce is not None and bounce.final, name


def test_a_failed_recipient_is_reported_before_a_delayed_one() -> None:
    raw = (
        b"From: MAILER-DAEMON@mail.example.com\r\n"
        b"Subject: Delivery report\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mail.example.com\r\n\r\n"
        b"Final-Recipient: rfc822; one@example.org\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\n"
        b"Final-Recipient: rfc822; two@example.org\r\nAction: delayed\r\nStatus: 4.2.2\r\n\r\n"
        b"Final-Recipient: rfc822; three@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"--b--\r\n"
    )
    bounce = parse_bounce(raw)
    assert bounce is not None
    assert (bounce.recipient, bounce.action, bounce.kind) == ("three@example.org", "failed", "hard")
    assert bounce.final


def test_a_report_with_only_delays_is_a_delay_notice() -> None:
    raw = (
        b"From: MAILER-DAEMON@mail.example.com\r\n"
        b"Subject: Delivery report\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mail.example.com\r\n\r\n"
        b"Final-Recipient: rfc822; one@example.org\r\nAction: delivered\r\nStatus: 2.0.0\r\n\r\n"
        b"Final-Recipient: rfc822; two@example.org\r\nStatus: 4.2.2\r\n"  # no Action: by class
        b"--b--\r\n"
    )
    bounce = parse_bounce(raw)
    assert bounce is not None
    assert (bounce.recipient, bounce.action, bounce.kind) == (
        "two@example.org",
        "delayed",
        "delayed",
    )
    assert not bounce.final


def test_a_success_dsn_is_not_a_bounce() -> None:
    raw = (
        b"From: Mail Delivery System <MAILER-DAEMON@mail.example.com>\r\n"
        b"Subject: Successful Mail Delivery Report\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nYour message was successfully delivered.\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mail.example.com\r\n\r\n"
        b"Final-Recipient: rfc822; one@example.org\r\nAction: delivered\r\nStatus: 2.0.0\r\n"
        b"--b--\r\n"
    )
    assert parse_bounce(raw) is None


def test_a_generic_status_gives_way_to_the_diagnostics_code() -> None:
    raw = (
        b"From: MAILER-DAEMON@mail.example.com\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; mail.example.com\r\n\r\n"
        b"Final-Recipient: RFC822; <Kim@Example.ORG>\r\nAction: failed\r\nStatus: 5.0.0\r\n"
        b"Diagnostic-Code: SMTP; 550 5.2.1 The email account that you tried to reach is"
        b" disabled\r\n"
        b"--b--\r\n"
    )
    bounce = parse_bounce(raw)
    assert bounce is not None
    assert (bounce.status, bounce.kind, bounce.recipient) == ("5.2.1", "hard", "kim@example.org")


def test_an_x_original_message_id_names_the_bounced_message() -> None:
    raw = (
        b"From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\r\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
        b"Reporting-MTA: dns; googlemail.com\r\n"
        b"X-Original-Message-ID: <abc123@acme.example.com>\r\n\r\n"
        b"Final-Recipient: rfc822; kim@example.org\r\nAction: failed\r\nStatus: 5.0.0\r\n"
        b"Diagnostic-Code: smtp; Your email to group kim@example.org was rejected due to spam"
        b" classification.\r\n"
        b"--b--\r\n"
    )
    bounce = parse_bounce(raw)
    assert bounce is not None
    assert bounce.original_message_id == "<abc123@acme.example.com>"
    assert bounce.kind == "policy"


def test_a_gmail_plain_text_bounce_of_old() -> None:
    raw = (
        b"Return-Path: <>\n"
        b"From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>\n"
        b"To: alex@acme.example.com\n"
        b"X-Failed-Recipients: gone@example.fr\n"
        b"Subject: Delivery Status Notification (Failure)\n"
        b"Content-Type: text/plain; charset=ISO-8859-1\n\n"
        b"Delivery to the following recipient failed permanently:\n\n"
        b"     gone@example.fr\n\n"
        b"Technical details of permanent failure:\n"
        b"Google tried to deliver your message, but it was rejected by the recipient domain.\n"
        b"The error that the other server returned was: 550 550 5.1.1 user unknown (state 14).\n\n"
        b"----- Original message -----\n\n"
        b"Message-ID: <orig-42@acme.example.com>\nSubject: hello\n\nhello\n"
    )
    bounce = parse_bounce(raw)
    assert bounce is not None
    assert (bounce.kind, bounce.status, bounce.recipient) == ("hard", "5.1.1", "gone@example.fr")
    assert bounce.original_message_id == "<orig-42@acme.example.com>"
    assert bounce.diagnostic is not None and "user unknown" in bounce.diagnostic


def test_an_exchange_2003_text_ndr() -> None:
    raw = (
        b"From: System Administrator <postmaster@example.org>\n"
        b"To: alex@acme.example.com\n"
        b"Subject: Undeliverable: Quick question\n"
        b"Content-Type: text/plain; charset=us-ascii\n\n"
        b"Your message did not reach some or all of the intended recipients.\n\n"
        b"      Subject:  Quick question\n"
        b"      Sent:     11/30/2026 10:02 AM\n\n"
        b"The following recipient(s) cannot be reached:\n\n"
        b"      bob@example.org on 11/30/2026 10:02 AM\n"
        b"            The e-mail account does not exist at the organization this message was"
        b" sent to.\n"
        b"            <mx.example.org #5.1.1>\n"
    )
    bounce = parse_bounce(raw)
    assert bounce is not None
    assert (bounce.kind, bounce.status, bounce.action) == ("hard", "5.1.1", "failed")
    assert (bounce.recipient, bounce.remote_mta) == ("bob@example.org", "mx.example.org")


def test_a_forwarded_bounce_from_a_person_is_not_a_bounce() -> None:
    raw = (
        b"From: Jane Doe <jane.doe@example.org>\n"
        b"To: alex@acme.example.com\n"
        b"Subject: Fwd: Undeliverable: Quick question\n\n"
        b"Any idea why this bounced?\n\n"
        b"---------- Forwarded message ---------\n"
        b"Delivery has failed to these recipients or groups:\n\n"
        b"bob@example.org\n"
        b"Remote Server returned '550 5.1.1 User unknown'\n"
    )
    assert parse_bounce(raw) is None


@pytest.mark.parametrize(
    "name",
    [
        "outlook-ooo-automatic-reply.eml",
        "gmail-vacation-responder.eml",
        "german-abwesenheitsnotiz.eml",
        "french-reponse-automatique.eml",
        "spanish-fuera-de-la-oficina.eml",
        "ticket-auto-acknowledgement.eml",
        "human-reply-quoting-footer.eml",
        "human-unsubscribe-request.eml",
        "human-reply-auto-submitted-no.eml",
        "human-reply-german-outlook.eml",
    ],
)
def test_replies_are_not_bounces(name: str) -> None:
    assert parse_bounce(fixture(name)) is None


# The classification table, case by case.
@pytest.mark.parametrize(
    ("action", "status", "diagnostic", "kind"),
    [
        ("delayed", "5.4.7", "smtp; 400 Could not connect", "delayed"),  # still retrying
        ("delayed", None, None, "delayed"),
        ("delayed", "4.2.2", "452 4.2.2 Mailbox full", "delayed"),
        ("failed", "4.0.0", "smtp; 426 connection timed out", "soft"),
        ("failed", "4.7.0", "421 4.7.0 Try again later, closing connection", "soft"),
        ("failed", "5.1.0", "550 5.1.0 Address rejected", "hard"),
        ("failed", "5.1.0", "550 5.1.0 Sender denied", "policy"),
        ("failed", "5.1.1", "550 5.1.1 user unknown", "hard"),
        ("failed", "5.1.2", "550 5.1.2 bad destination system address", "hard"),
        ("failed", "5.1.3", "501 5.1.3 Bad recipient address syntax", "hard"),
        ("failed", "5.1.6", "551 5.1.6 Recipient has moved", "hard"),
        ("failed", "5.1.10", "550 5.1.10 RESOLVER.ADR.RecipientNotFound", "hard"),
        ("failed", "5.1.8", "550 5.1.8 Access denied, bad outbound sender", "policy"),
        ("failed", "5.2.1", "550 5.2.1 The email account is disabled", "hard"),
        ("failed", "5.2.2", "552 5.2.2 Mailbox full", "soft"),
        ("failed", "5.2.3", "552 5.2.3 Message size exceeds fixed maximum", "policy"),
        ("failed", "5.4.1", "550 5.4.1 Recipient address rejected: Access denied", "hard"),
        ("failed", "5.4.4", "Host or domain name not found. Name service error", "hard"),
        ("failed", "5.4.4", "554 5.4.4 Unable to route", "soft"),
        ("failed", "5.4.6", "554 5.4.6 Routing loop detected", "soft"),
        ("failed", "5.4.7", "Message could not be delivered in the allotted time", "soft"),
        ("failed", "5.5.0", "550 5.5.0 Requested action not taken: mailbox unavailable", "hard"),
        ("failed", "5.5.0", "550 5.7.1 SPF unauthorized mail is prohibited", "policy"),
        ("failed", "5.6.0", "554 5.6.0 Message content rejected", "policy"),
        ("failed", "5.7.1", "554 5.7.1 Message rejected as spam", "policy"),
        ("failed", "5.7.1", "550 5.7.1 Recipient address rejected: User unknown", "policy"),
        ("failed", "5.7.13", "525 5.7.13 User account disabled", "hard"),
        ("failed", "5.7.26", "550 5.7.26 Unauthenticated email ... DMARC policy", "policy"),
        ("failed", "5.0.0", "smtp; 550 user unknown", "hard"),
        (
            "failed",
            "5.0.0",
            "smtp; 554 delivery error: this user doesn't have a ymail account",
            "hard",
        ),
        ("failed", "5.0.0", "smtp; 552 Requested mail action aborted: quota exceeded", "soft"),
        ("failed", "5.0.0", "smtp; 550 your IP has a poor reputation", "policy"),
        ("failed", None, "smtp; 550 No such user here", "hard"),
        ("failed", None, "smtp; 550 Requested action not taken: mailbox unavailable", "hard"),
        ("failed", None, "smtp; 550 Recipient does not exist", "hard"),
        ("failed", None, "smtp; 554 Message rejected as spam", "policy"),
        ("failed", None, "smtp; 550 Blocked: listed on the Spamhaus blocklist", "policy"),
        ("failed", None, "smtp; 550 Rejected due to DMARC policy", "policy"),
        ("failed", None, "smtp; 550 Mailbox is full", "soft"),
        ("failed", None, "smtp; 552 Quota exceeded", "soft"),
        ("failed", None, "smtp; 550 Please try again later", "soft"),
        ("failed", None, "smtp; 450 Greylisted", "soft"),
        ("failed", None, "smtp; 550 Administrative prohibition", "policy"),
        ("failed", None, "smtp; 550 Something went wrong", "hard"),
        ("failed", None, None, "hard"),
    ],
)
def test_the_classification_table(
    action: str, status: str | None, diagnostic: str | None, kind: str
) -> None:
    assert classify_bounce(action, status, diagnostic) == kind


# --------------------------------------------------------------------------- auto-replies

AUTO_REPLIES = [
    ("outlook-ooo-automatic-reply.eml", "out_of_office", date(2026, 12, 7)),
    ("gmail-vacation-responder.eml", "out_of_office", date(2026, 12, 3)),  # 12/03, US English
    ("german-abwesenheitsnotiz.eml", "out_of_office", date(2026, 12, 7)),
    ("french-reponse-automatique.eml", "out_of_office", date(2026, 12, 7)),
    ("spanish-fuera-de-la-oficina.eml", "out_of_office", date(2026, 12, 7)),  # 07/12, day-first
    ("ticket-auto-acknowledgement.eml", "auto_reply", None),
]


@pytest.mark.parametrize(
    ("name", "kind", "return_date"), AUTO_REPLIES, ids=[row[0] for row in AUTO_REPLIES]
)
def test_auto_reply_fixtures(name: str, kind: str, return_date: date | None) -> None:
    assert classify_auto_reply(fixture(name), received_at=RECEIVED) == AutoReply(kind, return_date)


@pytest.mark.parametrize(
    "name",
    [
        "human-reply-quoting-footer.eml",
        "human-unsubscribe-request.eml",
        "human-reply-auto-submitted-no.eml",  # says "out of the office", but a person wrote it
        "human-reply-german-outlook.eml",
    ],
)
def test_people_are_not_auto_replies(name: str) -> None:
    assert classify_auto_reply(fixture(name), received_at=RECEIVED) is None


def test_an_acknowledgement_promising_an_answer_by_a_date_is_not_an_absence() -> None:
    raw = headers(
        "From: Example Support <support@example.org>",
        "Subject: We received your request",
        "Auto-Submitted: auto-replied",
        body="Thank you for contacting us. We will get back to you by December 3.",
    )
    assert classify_auto_reply(raw, received_at=RECEIVED) == AutoReply("auto_reply", None)


def test_a_later_reception_drops_a_return_date_now_past() -> None:
    later = RECEIVED + timedelta(days=10)
    reply = classify_auto_reply(fixture("outlook-ooo-automatic-reply.eml"), received_at=later)
    assert reply == AutoReply("out_of_office", None)


def headers(*lines: str, body: str = "Thanks for your email.") -> bytes:
    return ("\r\n".join([*lines, "", body]) + "\r\n").encode()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (headers("From: a@example.org", "Subject: Hello", "X-Autoreply: yes"), "auto_reply"),
        (headers("From: a@example.org", "Subject: Hello", "X-Autorespond: yes"), "auto_reply"),
        (headers("From: a@example.org", "Subject: Hi", "Precedence: auto_reply"), "auto_reply"),
        (headers("From: a@example.org", "Subject: Out of Office: Hi"), "out_of_office"),
        (headers("From: a@example.org", "Subject: Automatic reply: Hi"), "out_of_office"),
        (headers("From: a@example.org", "Subject: Auto-Reply: Hi"), "out_of_office"),
        (headers("From: a@example.org", "Subject: Away until Monday"), "out_of_office"),
        (headers("From: a@example.org", "Subject: Automatische Antwort: Hi"), "out_of_office"),
        (headers("From: a@example.org", "Subject: Nicht im Buero"), None),
        (
            headers("From: a@example.org", "Subject: =?utf-8?q?Nicht_im_B=C3=BCro?="),
            "out_of_office",
        ),
        (headers("From: a@example.org", "Subject: Afwezig: Hi"), "out_of_office"),
        (headers("From: a@example.org", "Subject: Automatisch antwoord: Hi"), "out_of_office"),
        (headers("From: a@example.org", "Subject: Fuori sede"), "out_of_office"),
        (headers("From: a@example.org", "Subject: Risposta automatica: Hi"), "out_of_office"),
        (
            headers("From: a@example.org", "Subject: =?utf-8?q?Aus=C3=AAncia_tempor=C3=A1ria?="),
            "out_of_office",
        ),
        (
            headers("From: a@example.org", "Subject: =?utf-8?q?Resposta_autom=C3=A1tica=3A_Oi?="),
            "out_of_office",
        ),
        (headers("From: a@example.org", "Subject: =?utf-8?q?Fr=C3=A5nvaro?="), "out_of_office"),
        # a person answering a subject that happens to say it
        (headers("From: a@example.org", "Subject: Re: Out of office software"), None),
        # asks others not to answer: not itself an answer
        (headers("From: a@example.org", "Subject: Hi", "X-Auto-Response-Suppress: All"), None),
        (headers("From: a@example.org", "Subject: Hi", "X-MS-Exchange-Inbox-Rules-Loop: a"), None),
        (headers("From: a@example.org", "Subject: Hi", "Precedence: bulk"), None),
        (
            headers(
                "From: a@example.org",
                "Subject: Hi",
                "Precedence: bulk",
                body="I am out of the office this week.",
            ),
            "out_of_office",
        ),
        (
            headers(
                "From: a@example.org",
                "Subject: Automatic reply: Hi",
                "Auto-Submitted: no",
            ),
            None,
        ),
        (
            headers("From: a@example.org", "Subject: Hi", "Auto-Submitted: auto-generated"),
            "auto_reply",
        ),
    ],
)
def test_auto_reply_signals(raw: bytes, expected: str | None) -> None:
    reply = classify_auto_reply(raw, received_at=RECEIVED)
    assert (reply.kind if reply else None) == expected


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("I will be back on March 3.", None, date(2027, 3, 3)),
        ("I will be back on January 5th", None, date(2027, 1, 5)),
        ("Out of office, returning 2026-12-01.", None, date(2026, 12, 1)),
        ("Back on 03/12/2026.", "en-GB", date(2026, 12, 3)),
        ("Back on 03/12/2026.", "de-DE", date(2026, 12, 3)),
        ("Back on 12/03/2026.", "en-US", date(2026, 12, 3)),
        ("Back on 03/12/2026.", "en-US", None),  # 12 March 2026: already past
        ("Back on 12/15/2026.", "en-GB", date(2026, 12, 15)),  # 15 cannot be a month
        ("Ich bin zurück am 3. Dezember.", None, date(2026, 12, 3)),
        ("Ab dem 7. Dezember bin ich wieder im Büro.", None, date(2026, 12, 7)),
        ("Ich bin ab dem 7.12. wieder erreichbar.", None, date(2026, 12, 7)),
        ("Ich bin bis 04.12.2026 nicht im Büro.", None, date(2026, 12, 4)),
        ("Je serai de retour le 3 décembre.", None, date(2026, 12, 3)),
        ("Je serai de retour le 1er décembre.", None, date(2026, 12, 1)),
        ("Estaré de vuelta el 3 de diciembre.", None, date(2026, 12, 3)),
        ("Estaré de vuelta el 3 de diciembre de 2027.", None, date(2027, 12, 3)),
        ("Ik ben weer terug op 7 december.", None, date(2026, 12, 7)),
        ("Rientrerò in ufficio il 7 dicembre.", None, date(2026, 12, 7)),
        ("Estarei de volta em 7 de dezembro.", None, date(2026, 12, 7)),
        ("Jag är tillbaka den 7 december.", None, date(2026, 12, 7)),
        ("I'm out of the office until December 4.", None, date(2026, 12, 4)),
        ("Away December 1 - December 4, back December 7.", None, date(2026, 12, 7)),
        ("I'm away from 1 Dec to 5 Dec 2026.", None, date(2026, 12, 5)),
        ("I was out on 2026-11-02 and I am back on 2026-11-12.", None, None),  # both past
        ("I will be back on Monday.", None, None),
        ("I will be back in January.", None, None),
        ("Call me on 555-12-34 or at 10.30 tomorrow.", None, None),
        ("Back on 2031-01-01.", None, None),  # more than two years ahead
    ],
)
def test_return_dates(text: str, language: str | None, expected: date | None) -> None:
    assert parse_return_date(text, received_at=RECEIVED, language=language) == expected


def test_a_date_without_a_year_is_the_next_one() -> None:
    early = datetime(2026, 2, 1, tzinfo=UTC)
    assert parse_return_date("Back on March 3", received_at=early) == date(2026, 3, 3)
    leap = datetime(2027, 3, 1, tzinfo=UTC)
    assert parse_return_date("Back on Feb 29", received_at=leap) == date(2028, 2, 29)
    stale = datetime(2026, 12, 10, tzinfo=UTC)  # the notice was left on after the return
    assert parse_return_date("Back on December 7", received_at=stale) is None
    assert parse_return_date("Back on November 2", received_at=stale) is None
    assert parse_return_date("Back on October 1", received_at=stale) == date(2027, 10, 1)


# --------------------------------------------------------------------------- reply text

REPLY_TEXTS = [
    (
        "human-reply-quoting-footer.eml",
        "Hi Alex,\n\nThanks for reaching out \u2013 happy to chat next week. Tuesday at 10 works"
        " for me.\n\nBest,\nJane",
    ),
    ("human-unsubscribe-request.eml", "Please remove me from your list.\n\nThanks,\nMark"),
    (
        "human-reply-auto-submitted-no.eml",
        "Hi Alex,\n\nSorry for the slow answer - I was out of the office last week. Happy to\n"
        "talk, would Thursday afternoon work?\n\nKim",
    ),
    (
        "human-reply-german-outlook.eml",
        "Hallo Herr Turner,\n\ngerne, am Dienstag um 10 Uhr passt es mir.\n\n"
        "Viele Gr\u00fc\u00dfe\nKlaus Weber",
    ),
]


@pytest.mark.parametrize(("name", "expected"), REPLY_TEXTS, ids=[row[0] for row in REPLY_TEXTS])
def test_reply_text_drops_quoted_history(name: str, expected: str) -> None:
    assert reply_text(fixture(name)) == expected


def test_reply_text_of_an_html_only_reply() -> None:
    raw = headers(
        "From: a@example.org",
        "Subject: RE: Hi",
        "MIME-Version: 1.0",
        "Content-Type: text/html; charset=utf-8",
        body=(
            "<html><head><style>p{margin:0}</style></head><body>"
            "<p>Sounds good &amp; see you then.</p><p>Best,<br>Ana</p>"
            '<div id="appendonsend"></div><hr><div id="divRplyFwdMsg">'
            "<b>From:</b> Alex<br><b>Sent:</b> Monday</div>"
            "<div>Hi Ana ... <a href='https://track.acme.example.com/u/x'>Unsubscribe</a></div>"
            "</body></html>"
        ),
    )
    assert reply_text(raw) == "Sounds good & see you then.\n\nBest,\nAna"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes please.\n\n> quoted\n> more", "Yes please."),
        ("Top.\n\nOn Tue, 1 Dec 2026, Alex wrote:\n> old", "Top."),
        ("Oui.\n\nLe lun. 30 nov. 2026 à 11:02, Alex <a@b.c> a écrit :\n> old", "Oui."),
        ("Sí.\n\nEl lun, 30 nov 2026 a las 11:02, Alex (<a@b.c>) escribió:\n> old", "Sí."),
        ("Ja.\n\nAm 30.11.2026 um 11:02 schrieb Alex <a@b.c>:\n> alt", "Ja."),
        ("Ok.\n\n-----Ursprüngliche Nachricht-----\nVon: Alex\nGesendet: Montag", "Ok."),
        ("Ok.\n\nDe : Alex\nEnvoyé : lundi 30 novembre 2026\nÀ : Claire\nObjet : Hi", "Ok."),
        ("Sure.\n\n-- \nJane Doe\nCTO, Example", "Sure."),
        ("Sure.\n\nSent from my iPhone", "Sure."),
        ("Inline answer:\n> question?\nyes\n> another?\nno", "Inline answer:\nyes\nno"),
    ],
)
def test_quoted_history_and_signatures(text: str, expected: str) -> None:
    raw = headers(
        "From: a@example.org",
        "Subject: Re: Hi",
        "Content-Type: text/plain; charset=utf-8",
        body=text,
    )
    assert reply_text(raw) == expected


# --------------------------------------------------------------------------- unsubscribe


@pytest.mark.parametrize(
    "text",
    [
        "Unsubscribe",
        "please unsubscribe me",
        "Please remove me from your list.",
        "Remove my email address from your database.",
        "Take me off your list!",
        "take me off your mailing list",
        "Stop emailing me.",
        "Please stop.",
        "No more emails, thanks.",
        "Do not contact me again.",
        "Not interested, remove.",
        "I want to opt out",
        "I already unsubscribed and still get these.",
        "Bitte abmelden.",
        "Bitte tragen Sie mich aus Ihrem Verteiler aus.",
        "Bitte austragen!",
        "Keine weiteren E-Mails bitte.",
        "Merci de me désabonner.",
        "Veuillez me désinscrire de votre liste.",
        "Retirez-moi de votre liste.",
        "Por favor, darme de baja.",
        "Quiero darme de baja de su lista.",
        "No quiero recibir más correos.",
        "STOP",
        "Remove.",
    ],
)
def test_unsubscribe_requests(text: str) -> None:
    assert wants_unsubscribe(text)


@pytest.mark.parametrize(
    "text",
    [
        "Thanks, happy to chat next week.",
        "Not interested at the moment, maybe next quarter.",
        "Please stop by our booth at the fair.",
        "Stop the presses, this is great news.",
        "Please don't unsubscribe me, I like these.",
        "Do not remove me, I am interested!",
        "Bitte nicht abmelden.",
        "Sounds good.\n\nOn Mon, Nov 30, 2026 at 11:02 AM Alex <a@b.c> wrote:\n> Unsubscribe",
        "Gerne.\n\nVon: Alex\nGesendet: Montag\nAn: Klaus\n\nAbmelden: https://x",
        "Looks good.\n\n-- \nTo unsubscribe from our newsletter reply STOP",
        "",
    ],
)
def test_not_unsubscribe_requests(text: str) -> None:
    assert not wants_unsubscribe(text)


def test_our_own_quoted_footer_does_not_unsubscribe() -> None:
    raw = fixture("human-reply-quoting-footer.eml")
    whole = plain_body(raw)
    assert "Unsubscribe" in whole
    assert not wants_unsubscribe(whole)
    assert not wants_unsubscribe(reply_text(raw))
    german = fixture("human-reply-german-outlook.eml")
    assert "Abmelden" in plain_body(german)
    assert not wants_unsubscribe(plain_body(german))


def test_an_unsubscribe_reply_quoting_our_email() -> None:
    raw = fixture("human-unsubscribe-request.eml")
    assert wants_unsubscribe(plain_body(raw))
    assert wants_unsubscribe(reply_text(raw))


# --------------------------------------------------------------------------- robustness

ALL_FIXTURES = sorted(p.name for p in FIXTURES.glob("*.eml"))
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_never_raises(raw: bytes) -> None:
    bounce = parse_bounce(raw)
    assert bounce is None or bounce.kind in ("hard", "soft", "policy", "delayed")
    assert bounce is None or bounce.final == (bounce.kind != "delayed")
    reply = classify_auto_reply(raw, received_at=RECEIVED)
    assert reply is None or reply.kind in ("out_of_office", "auto_reply")
    if reply is not None and reply.return_date is not None:
        assert RECEIVED.date() <= reply.return_date <= RECEIVED.date() + timedelta(days=730)
    assert isinstance(reply_text(raw), str)


@QUICK
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    check_never_raises(raw)


@QUICK
@given(
    st.sampled_from(ALL_FIXTURES),
    st.integers(min_value=0, max_value=20000),
    st.integers(min_value=0, max_value=20000),
    st.binary(max_size=40),
)
def test_damaged_fixtures_never_raise(name: str, cut: int, at: int, noise: bytes) -> None:
    raw = fixture(name)
    damaged = raw[:at] + noise + raw[at:]
    check_never_raises(damaged[: max(cut, 1)])
    check_never_raises(damaged)


HEADER_NAMES = st.sampled_from(
    [
        "From",
        "Subject",
        "Auto-Submitted",
        "Precedence",
        "X-Failed-Recipients",
        "Content-Type",
        "Content-Transfer-Encoding",
        "Content-Language",
        "Return-Path",
        "References",
    ]
)
VALUES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(
        [
            "multipart/report; report-type=delivery-status; boundary=b",
            "message/delivery-status",
            "text/html; charset=x-unknown",
            "base64",
            "quoted-printable",
            "=?utf-8?q?Abwesenheitsnotiz=3A?=",
            "=?bogus?b?!!!?=",
            "MAILER-DAEMON@example.org",
            "auto-replied",
        ]
    ),
)
BODIES = st.lists(
    st.one_of(
        st.text(max_size=80),
        st.sampled_from(
            [
                "--b",
                "--b--",
                "Content-Type: message/delivery-status",
                "Content-Type: message/rfc822",
                "Content-Type: text/rfc822-headers",
                "Final-Recipient: rfc822; x@example.org",
                "Action: failed",
                "Status: 5.1.1",
                "Diagnostic-Code: smtp; 550 5.1.1 user unknown",
                "Hi. This is the qmail-send program at example.org.",
                "<x@example.org>:",
                "I am out of the office until 7.12. and back on 12/31/2026",
                "On Mon, Nov 30, 2026 at 11:02 AM Alex <a@b.c> wrote:",
                "> Unsubscribe",
                "",
            ]
        ),
    ),
    max_size=30,
)


@QUICK
@given(st.lists(st.tuples(HEADER_NAMES, VALUES), max_size=8), BODIES)
def test_mail_shaped_input_never_raises(fields: list[tuple[str, str]], body: list[str]) -> None:
    head = "\n".join(f"{name}: {value}" for name, value in fields)
    raw = f"{head}\n\n" + "\n".join(body)
    check_never_raises(raw.encode("utf-8", "surrogatepass"))


@QUICK
@given(st.text(max_size=400))
def test_text_functions_never_raise(text: str) -> None:
    assert isinstance(wants_unsubscribe(text), bool)
    found = parse_return_date(text, received_at=RECEIVED)
    assert found is None or RECEIVED.date() <= found <= RECEIVED.date() + timedelta(days=730)
