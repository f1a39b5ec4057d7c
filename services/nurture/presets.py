"""The built-in sequences every tenant starts with.

Offsets are days from enrollment; they become email steps separated by waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class PresetEmail:
    subject: str
    text: str


@dataclass(frozen=True, slots=True)
class Preset:
    key: str
    name: str
    description: str
    days: tuple[int, ...]
    emails: tuple[PresetEmail, ...]

    def steps(self) -> list[tuple[str, dict[str, Any]]]:
        steps: list[tuple[str, dict[str, Any]]] = []
        previous = 0
        for day, email in zip(self.days, self.emails, strict=True):
            if day > previous:
                steps.append(("wait", {"days": day - previous}))
            steps.append(("email", {"subject": email.subject, "text": email.text}))
            previous = day
        return steps


_SIGN = "\n\nBest,\nThe touchstream team"

AGGRESSIVE_CLOSE = Preset(
    key="aggressive_close",
    name="Aggressive close",
    description="Hot leads (grade A): three emails in five days.",
    days=(0, 2, 5),
    emails=(
        PresetEmail(
            "Quick conversation about {{ company }}?",
            "Hi {{ first_name }},\n\nI noticed {{ company }} is looking at ways to reach more"
            " customers. As {{ title }}, you are probably weighing a few options right now."
            "\n\nDo you have 15 minutes this week for a quick conversation?" + _SIGN,
        ),
        PresetEmail(
            "Still interested in a brief chat?",
            "Hi {{ first_name }},\n\nFollowing up on my note about {{ company }}. Teams like"
            " yours usually see results within the first month.\n\nWould Thursday or Friday"
            " work for a short call?" + _SIGN,
        ),
        PresetEmail(
            "Final check-in: are you open to one quick call?",
            "Hi {{ first_name }},\n\nI don't want to crowd your inbox, so this is my last note."
            " If improving outreach at {{ company }} is a priority this quarter, reply and we"
            " will find a time.\n\nIf not, no worries at all." + _SIGN,
        ),
    ),
)

REGULAR_NURTURE = Preset(
    key="regular_nurture",
    name="Regular nurture",
    description="Warm leads (grade B): four emails over ten days.",
    days=(0, 3, 7, 10),
    emails=(
        PresetEmail(
            "An article {{ company }} might find useful",
            "Hi {{ first_name }},\n\nHere is a short read on how teams structure multi-step"
            " outreach without annoying their prospects: what to send, when, and when to stop."
            "\n\nHope it is useful for {{ company }}." + _SIGN,
        ),
        PresetEmail(
            "How others in your role approach it",
            "Hi {{ first_name }},\n\nMost {{ title }}s we talk to start with one question: how"
            " do we follow up consistently without doing it by hand? Here is how three teams"
            " answered it." + _SIGN,
        ),
        PresetEmail(
            "A checklist for your next campaign",
            "Hi {{ first_name }},\n\nA one-page checklist we use before every campaign: send"
            " windows, caps per mailbox, reply handling, unsubscribe links." + _SIGN,
        ),
        PresetEmail(
            "Would a quick conversation help?",
            "Hi {{ first_name }},\n\nIf any of this is on the table at {{ company }}, would a"
            " quick conversation help? Just reply with a time that suits you." + _SIGN,
        ),
    ),
)

LONG_TERM_NURTURE = Preset(
    key="long_term_nurture",
    name="Long-term nurture",
    description="Cool leads (grade C): six emails over 25 days.",
    days=(0, 5, 10, 15, 20, 25),
    emails=tuple(
        PresetEmail(subject, "Hi {{ first_name }},\n\n" + body + _SIGN)
        for subject, body in (
            ("Ideas for {{ company }}", "A few ideas we have seen work for teams like yours."),
            ("A case study worth five minutes", "How one team doubled its reply rate."),
            ("The one metric to watch", "Reply rate of sent beats open rate every time."),
            ("What we learned from 1,000 sequences", "Shorter emails, fewer steps, better timing."),
            ("A template you can steal", "Our best-performing first email, annotated."),
            ("Should I keep these coming?", "Happy to keep sharing, or to stop: just reply."),
        )
    ),
)

COLD_OUTREACH = Preset(
    key="cold_outreach",
    name="Cold outreach",
    description="New or unknown leads: eight weekly emails.",
    days=(0, 7, 14, 21, 28, 35, 42, 49),
    emails=tuple(
        PresetEmail(subject, "Hi {{ first_name }},\n\n" + body + _SIGN)
        for subject, body in (
            (
                "Introducing ourselves to {{ company }}",
                "We help teams run outreach that stops the moment a prospect replies.",
            ),
            ("A question about {{ company }}'s outreach", "How do you follow up today?"),
            (
                "Three numbers from teams like yours",
                "Fewer duplicates, faster replies, no dropped mail.",
            ),
            ("Worth a look, {{ first_name }}?", "A two-minute overview of how it works."),
            ("How {{ title }}s use it", "What your peers automate first."),
            (
                "Still relevant for {{ company }}?",
                "If the timing is wrong, tell me and I will stop.",
            ),
            ("One last resource", "Our guide to send windows and caps."),
            ("Closing the loop", "I will stop here. Reply any time if this becomes a priority."),
        )
    ),
)

PRESETS: dict[str, Preset] = {
    p.key: p for p in (AGGRESSIVE_CLOSE, REGULAR_NURTURE, LONG_TERM_NURTURE, COLD_OUTREACH)
}
