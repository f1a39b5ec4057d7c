"""Mailboxes: sending identities with their transports, caps and DKIM key.

Secrets (SMTP passwords, API keys) are given either inline, or as the name of an
environment variable holding them (``password_env``, ``api_key_env``); the API
never shows an inline secret back.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from services.sender.domain import Caps
from services.sender.mime import DkimKey
from services.sender.transport import SmtpConfig, SmtpTransport, Transport

ADDRESS = r"^[^@\s<>]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$"


class MailboxInvalid(ValueError):
    """A mailbox definition breaks a rule; the message says which."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _secret(inline: SecretStr | None, env: str | None, what: str) -> str | None:
    if inline is not None:
        return inline.get_secret_value()
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise MailboxInvalid(f"{what}: environment variable {env} is not set")
        return value
    return None


class SmtpTransportConfig(_Model):
    type: Literal["smtp"] = "smtp"
    host: str = Field(min_length=1)
    port: int = Field(default=587, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    starttls: bool = False
    tls: bool = False
    validate_certs: bool = True
    ca_file: str | None = None
    timeout: float = Field(default=30.0, gt=0, le=300)
    #: Pipeline MAIL FROM, RCPT TO and DATA (RFC 2920) when the server offers it.
    pipelining: bool = True

    @model_validator(mode="after")
    def _tls(self) -> SmtpTransportConfig:
        if self.starttls and self.tls:
            raise ValueError("choose starttls (upgrade) or tls (implicit), not both")
        return self


class SendGridConfig(_Model):
    type: Literal["sendgrid"] = "sendgrid"
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    base_url: str = "https://api.sendgrid.com"


class MailgunConfig(_Model):
    type: Literal["mailgun"] = "mailgun"
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    domain: str = Field(min_length=3)
    base_url: str = "https://api.mailgun.net"


class PostmarkConfig(_Model):
    type: Literal["postmark"] = "postmark"
    server_token: SecretStr | None = None
    server_token_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    base_url: str = "https://api.postmarkapp.com"
    message_stream: str = "outbound"


TransportConfig = Annotated[
    SmtpTransportConfig | SendGridConfig | MailgunConfig | PostmarkConfig,
    Field(discriminator="type"),
]


class DkimConfig(_Model):
    domain: str = Field(min_length=3)
    selector: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    private_key: SecretStr

    @model_validator(mode="after")
    def _pem(self) -> DkimConfig:
        if "PRIVATE KEY" not in self.private_key.get_secret_value():
            raise ValueError("private_key must be a PEM private key")
        return self


class MailboxSpec(_Model):
    email: str = Field(pattern=ADDRESS)
    display_name: str | None = Field(default=None, max_length=200)
    transports: list[TransportConfig] = Field(min_length=1, max_length=5)
    daily_cap: int | None = Field(default=None, gt=0)
    hourly_cap: int | None = Field(default=None, gt=0)
    domain_hourly_cap: int | None = Field(default=None, gt=0)
    dkim: DkimConfig | None = None
    enabled: bool = True

    @model_validator(mode="after")
    def _no_line_breaks(self) -> MailboxSpec:
        for value in (self.email, self.display_name or ""):
            if "\r" in value or "\n" in value:
                raise ValueError("mailbox addresses and names may not contain line breaks")
        return self


def parse_spec(data: Any) -> MailboxSpec:
    try:
        return MailboxSpec.model_validate(data)
    except ValidationError as exc:
        parts = []
        for error in exc.errors()[:5]:
            loc = ".".join(str(p) for p in error.get("loc", ()))
            parts.append(f"{loc}: {str(error.get('msg', '')).removeprefix('Value error, ')}")
        raise MailboxInvalid("; ".join(parts)) from exc


def stored_transports(spec: MailboxSpec) -> list[dict[str, Any]]:
    """Transport configs as stored (secrets in clear: the table is the sender's own)."""
    stored = []
    for t in spec.transports:
        data = t.model_dump(mode="python")
        for key, value in list(data.items()):
            if isinstance(value, SecretStr):
                data[key] = value.get_secret_value()
        stored.append(data)
    return stored


def redacted(transports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    secret_keys = {"password", "api_key", "server_token"}
    return [
        {k: ("***" if k in secret_keys and v else v) for k, v in t.items() if v is not None}
        for t in transports
    ]


@dataclass
class Mailbox:
    """A mailbox as the dispatcher uses it."""

    id: uuid.UUID | None  # None: the deployment's default identity (settings)
    tenant_id: str
    email: str
    display_name: str | None
    transports: list[dict[str, Any]]
    caps: Caps
    dkim: DkimKey | None = None
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return str(self.id) if self.id is not None else f"default:{self.tenant_id}"


def mailbox_from_row(row: Any) -> Mailbox:
    dkim = None
    if row["dkim_domain"] and row["dkim_selector"] and row["dkim_private_key"]:
        dkim = DkimKey(row["dkim_domain"], row["dkim_selector"], row["dkim_private_key"].encode())
    return Mailbox(
        id=row["id"],
        tenant_id=row["tenant_id"],
        email=row["email"],
        display_name=row["display_name"],
        transports=list(row["transports"]),
        caps=Caps(row["daily_cap"], row["hourly_cap"], row["domain_hourly_cap"]),
        dkim=dkim,
        version=str(row["updated_at"]),
    )


def build_transport(config: dict[str, Any], index: int) -> Transport:
    """A live transport for a stored config."""
    kind = config["type"]
    name = f"{kind}#{index}"
    if kind == "smtp":
        spec = SmtpTransportConfig.model_validate(config)
        return SmtpTransport(
            SmtpConfig(
                host=spec.host,
                port=spec.port,
                username=spec.username,
                password=_secret(spec.password, spec.password_env, "smtp password"),
                starttls=spec.starttls,
                tls=spec.tls,
                timeout=spec.timeout,
                validate_certs=spec.validate_certs,
                ca_file=spec.ca_file,
                pipelining=spec.pipelining,
            ),
            name=name,
        )
    from services.sender import providers

    if kind == "sendgrid":
        sg = SendGridConfig.model_validate(config)
        key = _secret(sg.api_key, sg.api_key_env, "sendgrid api_key") or ""
        return providers.SendGridTransport(key, base_url=sg.base_url, name=name)
    if kind == "mailgun":
        mg = MailgunConfig.model_validate(config)
        key = _secret(mg.api_key, mg.api_key_env, "mailgun api_key") or ""
        return providers.MailgunTransport(key, mg.domain, base_url=mg.base_url, name=name)
    if kind == "postmark":
        pm = PostmarkConfig.model_validate(config)
        token = _secret(pm.server_token, pm.server_token_env, "postmark server_token") or ""
        return providers.PostmarkTransport(
            token, base_url=pm.base_url, name=name, message_stream=pm.message_stream
        )
    raise MailboxInvalid(f"unknown transport type {kind!r}")


class TransportPool:
    """Live transports per mailbox, reused across sends (SMTP connections stay open),
    rebuilt when the mailbox changes."""

    def __init__(self) -> None:
        self._live: dict[str, tuple[str, list[Transport]]] = {}

    async def for_mailbox(self, mailbox: Mailbox) -> list[Transport]:
        current = self._live.get(mailbox.key)
        if current is not None and current[0] == mailbox.version:
            return current[1]
        if current is not None:
            for transport in current[1]:
                await transport.close()
        transports = [build_transport(c, i) for i, c in enumerate(mailbox.transports)]
        self._live[mailbox.key] = (mailbox.version, transports)
        return transports

    async def close(self) -> None:
        for _version, transports in self._live.values():
            for transport in transports:
                await transport.close()
        self._live.clear()
