"""Message build cost: the sender's builder (email.mime, compat32) against building
the same message with ``EmailMessage`` and the default policy, in the same process.

    python -m bench.message_build [--messages 3000]
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP

from services.sender.mime import OutgoingEmail, TrackingConfig, build_message

CONFIG = TrackingConfig(
    base_url="https://t.example.com",
    secret=b"bench-secret",
    unsubscribe_mailto="unsubscribe@example.com",
    physical_address="1 Main Street, Springfield",
)
HTML = (
    "<p>Hi Ada,</p><p>I noticed Acme is hiring. Here is "
    '<a href="https://example.com/guide">a guide</a> and '
    '<a href="https://example.com/case">a case study</a>.</p><p>Best, Sam</p>'
)


def email(n: int) -> OutgoingEmail:
    return OutgoingEmail(
        delivery_key=f"enrollment-{n}:1",
        from_email="sam@acme.example",
        from_name="Sam Sender",
        to_email=f"ada{n}@example.org",
        to_name="Ada Lovelace",
        subject="Quick conversation about Acme?",
        text="",
        html=HTML,
        thread_delivery_key=f"enrollment-{n}:0",
        tracking=True,
    )


def ours(count: int) -> float:
    now = datetime.now(UTC)
    started = time.perf_counter()
    for n in range(count):
        build_message(email(n), CONFIG, now)
    return (time.perf_counter() - started) / count


def baseline(count: int) -> float:
    """The same headers and parts with EmailMessage and the default (SMTP) policy."""
    started = time.perf_counter()
    for n in range(count):
        message = EmailMessage(policy=SMTP)
        message["Message-ID"] = f"<{n}@acme.example>"
        message["Date"] = "Sat, 21 Nov 2026 10:00:00 +0000"
        message["From"] = "Sam Sender <sam@acme.example>"
        message["To"] = f"Ada Lovelace <ada{n}@example.org>"
        message["Subject"] = "Quick conversation about Acme?"
        message["In-Reply-To"] = "<first@acme.example>"
        message["References"] = "<first@acme.example>"
        message["List-Unsubscribe"] = "<https://t.example.com/u/token>"
        message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        message.set_content("Hi Ada, I noticed Acme is hiring.")
        message.add_alternative(HTML, subtype="html")
        message.as_bytes()
    return (time.perf_counter() - started) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    ours(200)
    baseline(200)  # warm up
    mine, theirs = ours(args.messages), baseline(args.messages)
    print(f"message build ({args.messages} messages, tracking + threading + unsubscribe):")
    print(f"  touchstream builder : {mine * 1e6:8.0f} us/message ({1 / mine:8.0f}/s)")
    print(f"  EmailMessage (SMTP) : {theirs * 1e6:8.0f} us/message ({1 / theirs:8.0f}/s)")
    print(f"  ratio               : {theirs / mine:.1f}x faster than the baseline")


if __name__ == "__main__":
    main()
