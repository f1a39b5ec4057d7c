"""Settings, from the environment (pydantic-settings).

Shared settings are read from unprefixed variables (``DATABASE_URL``,
``KAFKA_BOOTSTRAP_SERVERS``, ``TOUCHSTREAM_*``); each service's own settings carry
its prefix (``ROUTER_``, ``NURTURE_``, ``SENDER_``, ``TRACKER_``).
"""

from __future__ import annotations

from pydantic import AwareDatetime, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """What every service needs."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    database_url: str = Field(
        default="postgresql://touchstream@127.0.0.1:5432/touchstream",
        validation_alias="DATABASE_URL",
    )
    database_pool_size: int = Field(default=10, ge=1, validation_alias="DATABASE_POOL_SIZE")
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", validation_alias="KAFKA_BOOTSTRAP_SERVERS"
    )
    #: Consumer group session timeout; a new group gets its first record after
    #: about half of it.
    kafka_session_timeout_ms: int = Field(
        default=10_000, ge=1_000, validation_alias="KAFKA_SESSION_TIMEOUT_MS"
    )
    kafka_max_batch: int = Field(default=500, ge=1, validation_alias="KAFKA_MAX_BATCH")
    #: How long the broker may hold a fetch that finds no new record (the client's
    #: long poll). Shorter: a record reaches an idle consumer sooner, for a few more
    #: empty fetches while idle.
    kafka_fetch_max_wait_ms: int = Field(
        default=500, ge=1, le=10_000, validation_alias="KAFKA_FETCH_MAX_WAIT_MS"
    )
    #: How long an idle consumer waits on its fetcher for a record before polling
    #: again. faststream also pauses this long after an empty poll, so a record that
    #: reaches an idle consumer may wait up to twice this before it is applied.
    kafka_poll_timeout_ms: int = Field(
        default=20, ge=1, le=10_000, validation_alias="KAFKA_POLL_TIMEOUT_MS"
    )
    #: Partitions of a fetched batch applied side by side, each in its own transaction.
    kafka_consumer_concurrency: int = Field(
        default=2, ge=1, le=64, validation_alias="KAFKA_CONSUMER_CONCURRENCY"
    )
    topic_partitions: int = Field(default=6, ge=1, validation_alias="TOUCHSTREAM_TOPIC_PARTITIONS")
    topic_replication: int = Field(
        default=1, ge=1, validation_alias="TOUCHSTREAM_TOPIC_REPLICATION"
    )
    #: Seconds of product time per second of wall time (86400 = a day per second).
    clock_speed: float = Field(default=1.0, gt=0, validation_alias="TOUCHSTREAM_CLOCK_SPEED")
    #: The wall-clock instant the fast clock starts from; every process of one
    #: deployment must share it.
    clock_origin: AwareDatetime | None = Field(
        default=None, validation_alias="TOUCHSTREAM_CLOCK_ORIGIN"
    )
    #: The product time at the origin (default: the origin): lets a demo or a test
    #: start on a given day, e.g. a Monday morning.
    clock_start: AwareDatetime | None = Field(
        default=None, validation_alias="TOUCHSTREAM_CLOCK_START"
    )
    #: Secret that signs tracking tokens (open pixel, click, unsubscribe). Shared by
    #: the sender (which mints tokens) and the tracker (which verifies them).
    tracking_secret: SecretStr | None = Field(
        default=None, validation_alias="TOUCHSTREAM_TRACKING_SECRET"
    )
    tracker_public_url: str = Field(
        default="http://127.0.0.1:8084", validation_alias="TRACKER_PUBLIC_URL"
    )
    log_level: str = Field(default="INFO", validation_alias="TOUCHSTREAM_LOG_LEVEL")
    log_json: bool = Field(default=False, validation_alias="TOUCHSTREAM_LOG_JSON")
    http_host: str = Field(default="0.0.0.0", validation_alias="TOUCHSTREAM_HTTP_HOST")
    #: Stop a consumer when at least this share of the last ``dlq_limit_window``
    #: messages went to its dead-letter topic: that is a bad deploy, not bad data.
    dlq_limit_ratio: float = Field(default=0.95, gt=0, le=1, validation_alias="DLQ_LIMIT_RATIO")
    dlq_limit_window: int = Field(default=1000, ge=10, validation_alias="DLQ_LIMIT_WINDOW")


class RouterSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="ROUTER_", extra="ignore", populate_by_name=True)

    http_port: int = 8081
    default_sequence: str = "cold_outreach"


class NurtureSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="NURTURE_", extra="ignore", populate_by_name=True)

    http_port: int = 8082
    #: Due enrollments claimed per scheduler round.
    scheduler_batch: int = Field(default=1000, ge=1)
    #: Scheduler loops per process: rounds claim disjoint rows (SKIP LOCKED), so one
    #: loop's transaction runs in PostgreSQL while another's Python prepares its round.
    scheduler_loops: int = Field(default=2, ge=1, le=16)
    #: Wall seconds between scheduler rounds when nothing was due.
    scheduler_idle_seconds: float = Field(default=0.1, gt=0)
    #: Signs outbound `notify` webhooks (X-Touchstream-Signature).
    webhook_secret: SecretStr | None = None
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1)


class SenderSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="SENDER_", extra="ignore", populate_by_name=True)

    http_port: int = 8083
    #: StepDue is a send's last hop: at a launch, or whenever a step falls due, the
    #: sender's idle consumer should not wait out the broker's long poll (a broker
    #: that does not answer a fetch early holds it for up to this long).
    kafka_fetch_max_wait_ms: int = Field(
        default=100, ge=1, le=10_000, validation_alias="KAFKA_FETCH_MAX_WAIT_MS"
    )
    smtp_host: str = Field(default="127.0.0.1", validation_alias="SMTP_HOST")
    smtp_port: int = Field(default=1025, validation_alias="SMTP_PORT")
    smtp_username: str | None = Field(default=None, validation_alias="SMTP_USERNAME")
    smtp_password: SecretStr | None = Field(default=None, validation_alias="SMTP_PASSWORD")
    smtp_starttls: bool = Field(default=False, validation_alias="SMTP_STARTTLS")
    smtp_tls: bool = Field(default=False, validation_alias="SMTP_TLS")
    smtp_timeout: float = Field(default=30.0, gt=0, validation_alias="SMTP_TIMEOUT")
    #: The default sending identity, used when a tenant has no mailbox of its own.
    from_email: str = "outreach@touchstream.example"
    from_name: str = "touchstream"
    #: Optional mailto: address for List-Unsubscribe, next to the https URL.
    unsubscribe_mailto: str | None = None
    #: Postal address printed at the foot of every email (CAN-SPAM).
    physical_address: str | None = None
    #: Wall seconds a claimed delivery stays claimed before another sender may
    #: take it (claimed, not yet handed to SMTP) or flag it uncertain (sending).
    lease_seconds: float = Field(default=30.0, gt=0)
    dispatch_batch: int = Field(default=100, ge=1)
    dispatch_idle_seconds: float = Field(default=0.1, gt=0)
    #: Product-time seconds before a transient failure is retried; the wait doubles
    #: per attempt (with jitter) up to ``retry_max_seconds``, or longer when the server
    #: asks for it (Retry-After).
    retry_base_seconds: float = Field(default=60.0, gt=0)
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    #: Give a delivery up (EmailFailed, never a suppression) after this many
    #: transiently failed attempts. None, the default: a throttled or transiently
    #: failing delivery is deferred again and again, never dropped.
    max_attempts: int | None = Field(default=None, ge=1)
    #: Caps of the default mailbox (the SMTP_* server with SENDER_FROM_EMAIL), used
    #: for tenants that have no mailbox of their own.
    daily_cap: int | None = Field(default=None, gt=0)
    hourly_cap: int | None = Field(default=None, gt=0)
    domain_hourly_cap: int | None = Field(default=None, gt=0)
    #: Sends per wall-clock second across all sender replicas (None: no limit).
    global_rate: int | None = Field(default=None, gt=0)
    #: Deliveries in flight per sender process, each on its own connection. A crash
    #: leaves at most this many deliveries uncertain.
    concurrency: int = Field(default=1, ge=1, le=64)
    #: A soft bounce reported later sends the message again, this many times at most.
    soft_bounce_retries: int = Field(default=3, ge=0)
    soft_bounce_retry_seconds: float = Field(default=3600.0, gt=0)


class TrackerSettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="TRACKER_", extra="ignore", populate_by_name=True)

    http_port: int = 8084
    #: Bearer token that the inbound-email webhook requires.
    inbound_token: SecretStr | None = None
    #: Kafka brokers take records of about 1 MiB by default; stay below that.
    max_body_bytes: int = Field(default=768 * 1024, ge=1024)
    #: Wall seconds a validly signed token waits for its message to be registered
    #: (the EmailSent may still be on its way) before it is answered as unknown.
    registry_wait_seconds: float = Field(default=3.0, ge=0)
    #: SendGrid Event Webhook verification key (base64 DER or PEM, as SendGrid shows it).
    sendgrid_public_key: str | None = None
    #: Mailgun webhook signing key (HMAC-SHA256).
    mailgun_signing_key: SecretStr | None = None
    #: Postmark webhooks: the basic-auth credentials set in the webhook URL.
    postmark_username: str | None = None
    postmark_password: SecretStr | None = None
    #: Amazon SNS topics (ARNs, comma-separated) whose SES notifications are accepted.
    ses_topic_arns: str = ""
    #: How old a signed webhook timestamp may be (replay window), in seconds.
    webhook_tolerance_seconds: int = Field(default=300, ge=10)

    def ses_topics(self) -> set[str]:
        return {arn.strip() for arn in self.ses_topic_arns.split(",") if arn.strip()}
