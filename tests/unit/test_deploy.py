"""Static checks of the deployment files under deploy/ (no Docker, no cluster).

The environment variables a touchstream container may receive are derived from
the pydantic-settings classes in services/runtime/settings.py, so a renamed
setting or a typo in compose.yaml / the Kubernetes manifests fails here instead
of being silently ignored at runtime.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = DEPLOY / "compose.yaml"
TOPICS_FILE = DEPLOY / "topics.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
README = DEPLOY / "README.md"

SERVICE_PORTS: dict[str, int] = {"router": 8081, "nurture": 8082, "sender": 8083, "tracker": 8084}


def _consumed_topics() -> dict[str, frozenset[str]]:
    """What each service consumes, read from the services themselves."""
    from services.nurture.app import NurtureService
    from services.router.app import RouterService
    from services.runtime import settings as st
    from services.sender.app import SenderService
    from services.tracker.app import TrackerService

    secret = {"TOUCHSTREAM_TRACKING_SECRET": "test"}
    services = {
        "router": RouterService(st.RouterSettings()),
        "nurture": NurtureService(st.NurtureSettings()),
        "sender": SenderService(st.SenderSettings(**secret)),
        "tracker": TrackerService(st.TrackerSettings(**secret)),
    }
    return {name: frozenset(svc.topic_handlers()) for name, svc in services.items()}


CONSUMES: dict[str, frozenset[str]] = _consumed_topics()
ONE_SHOT_COMMANDS: tuple[tuple[str, ...], ...] = (("topics", "create"), ("migrate",))
SETTINGS_CLASSES = (
    "CommonSettings",
    "RouterSettings",
    "NurtureSettings",
    "SenderSettings",
    "TrackerSettings",
)
SECRET_VARS = frozenset(
    {
        "TOUCHSTREAM_TRACKING_SECRET",
        "TRACKER_INBOUND_TOKEN",
        "NURTURE_WEBHOOK_SECRET",
        "SMTP_PASSWORD",
    }
)
#: The documented variables (deploy/README.md); each must exist in the settings.
DOCUMENTED_VARS = frozenset(
    {
        "DATABASE_URL", "DATABASE_POOL_SIZE", "KAFKA_BOOTSTRAP_SERVERS",
        "KAFKA_SESSION_TIMEOUT_MS", "KAFKA_MAX_BATCH", "KAFKA_FETCH_MAX_WAIT_MS",
        "KAFKA_POLL_TIMEOUT_MS", "TOUCHSTREAM_TOPIC_PARTITIONS",
        "TOUCHSTREAM_TOPIC_REPLICATION", "TOUCHSTREAM_CLOCK_SPEED", "TOUCHSTREAM_CLOCK_ORIGIN",
        "TOUCHSTREAM_TRACKING_SECRET", "TRACKER_PUBLIC_URL", "TOUCHSTREAM_LOG_LEVEL",
        "TOUCHSTREAM_LOG_JSON", "TOUCHSTREAM_HTTP_HOST", "DLQ_LIMIT_RATIO", "DLQ_LIMIT_WINDOW",
        "ROUTER_HTTP_PORT", "ROUTER_DEFAULT_SEQUENCE",
        "NURTURE_HTTP_PORT", "NURTURE_SCHEDULER_BATCH", "NURTURE_SCHEDULER_IDLE_SECONDS",
        "NURTURE_WEBHOOK_SECRET",
        "SENDER_HTTP_PORT", "SMTP_HOST", "SMTP_PORT", "SMTP_USERNAME", "SMTP_PASSWORD",
        "SMTP_STARTTLS", "SMTP_TLS", "SMTP_TIMEOUT", "SENDER_FROM_EMAIL", "SENDER_FROM_NAME",
        "SENDER_UNSUBSCRIBE_MAILTO", "SENDER_LEASE_SECONDS", "SENDER_DISPATCH_BATCH",
        "SENDER_MAX_ATTEMPTS",
        "TRACKER_HTTP_PORT", "TRACKER_INBOUND_TOKEN", "TRACKER_MAX_BODY_BYTES",
        "TRACKER_REGISTRY_WAIT_SECONDS",
    }
)  # fmt: skip
#: Variables of the third-party images (Kafka, PostgreSQL, mailpit); allowed only
#: in containers that do not run the touchstream image.
THIRD_PARTY_ENV = re.compile(r"^(?:POSTGRES_[A-Z0-9_]+|KAFKA_[A-Z0-9_]+|CLUSTER_ID|MP_[A-Z0-9_]+)$")
#: aiokafka's default max_request_size; services/runtime/kafka.py does not raise it,
#: so one webhooks-raw record (body + JSON envelope) must fit in it.
PRODUCER_MAX_REQUEST_BYTES = 1024 * 1024
NAMESPACE = "touchstream"
CLUSTER_SCOPED_KINDS = frozenset({"Namespace", "Kustomization"})


# --------------------------------------------------------------------------- helpers


def _import(module: str) -> Any:
    """Import a module of this repository, installed or not."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(module)


@cache
def allowed_env() -> frozenset[str]:
    """Every variable name the touchstream settings classes read."""
    settings = _import("services.runtime.settings")
    names: set[str] = set()
    for class_name in SETTINGS_CLASSES:
        cls = getattr(settings, class_name)
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, str):
                names.add(alias.upper())
            elif alias is None:
                names.add(f"{prefix}{field_name}".upper())
            else:  # AliasChoices: every plain-string choice is a valid name
                choices = getattr(alias, "choices", [])
                names.update(c.upper() for c in choices if isinstance(c, str))
    return frozenset(names)


@cache
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


def compose_services() -> dict[str, dict[str, Any]]:
    services = compose().get("services")
    assert isinstance(services, dict) and services, "compose.yaml has no services"
    return services


def image_repo(image: str) -> str:
    """`registry.example.com/team/touchstream:1.0@sha256:...` -> `touchstream`."""
    without_digest = image.split("@", 1)[0]
    last = without_digest.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def compose_is_touchstream(service: dict[str, Any]) -> bool:
    return "build" in service or image_repo(str(service.get("image", ""))) == "touchstream"


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (str(item).split("=", 1) for item in env)
        return {pair[0]: pair[1] if len(pair) > 1 else "" for pair in pairs}
    assert isinstance(env, dict), f"environment must be a mapping or a list, got {env!r}"
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def compose_command(service: dict[str, Any]) -> tuple[str, ...]:
    command = service.get("command")
    if isinstance(command, str):
        return tuple(command.split())
    assert isinstance(command, list), f"command must be set explicitly, got {command!r}"
    return tuple(str(part) for part in command)


def run_services() -> dict[str, dict[str, Any]]:
    """Compose services that run one touchstream service, by touchstream service name."""
    found: dict[str, dict[str, Any]] = {}
    for service in compose_services().values():
        if compose_is_touchstream(service):
            command = compose_command(service)
            if command[:1] == ("run",):
                found[command[1]] = service
    return found


@cache
def topics_spec() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(TOPICS_FILE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("topics"), list)
    by_name: dict[str, dict[str, Any]] = {}
    for topic in data["topics"]:
        name = topic["name"]
        assert name not in by_name, f"topic {name} is declared twice"
        by_name[name] = topic
    return by_name


def partitions(topic: str) -> int:
    spec = topics_spec().get(topic)
    assert spec is not None, f"topic {topic} is not declared in topics.yaml"
    value = spec["partitions"]
    assert isinstance(value, int)
    return value


def k8s_files() -> list[Path]:
    files = sorted(K8S.glob("*.yaml")) + sorted(K8S.glob("*.yml"))
    assert files, "deploy/k8s has no manifests"
    return files


@cache
def k8s_docs() -> tuple[tuple[str, dict[str, Any]], ...]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in k8s_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path.name}: a document is not a mapping"
            docs.append((path.name, doc))
    return tuple(docs)


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_docs() if doc.get("kind") == kind]


def k8s_named(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for doc in k8s_kind(kind) if doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind} {name}, found {len(matches)}"
    return matches[0]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(workload name, pod spec) of every Deployment and Job."""
    for kind in ("Deployment", "Job", "StatefulSet", "DaemonSet", "CronJob"):
        for doc in k8s_kind(kind):
            spec = doc["spec"]
            if kind == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            yield f"{kind}/{doc['metadata']['name']}", spec["template"]["spec"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec["containers"])


def is_touchstream_container(container: dict[str, Any]) -> bool:
    return image_repo(str(container.get("image", ""))) == "touchstream"


def secret_data(doc: dict[str, Any]) -> dict[str, Any]:
    return {**(doc.get("data") or {}), **(doc.get("stringData") or {})}


def configmap_data() -> dict[str, Any]:
    data = k8s_named("ConfigMap", "touchstream-config").get("data")
    assert isinstance(data, dict)
    return data


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def deployment(service: str) -> dict[str, Any]:
    return k8s_named("Deployment", f"touchstream-{service}")


def only_container(doc: dict[str, Any]) -> dict[str, Any]:
    found = doc["spec"]["template"]["spec"]["containers"]
    assert len(found) == 1, f"{doc['metadata']['name']}: expected one container"
    container = found[0]
    assert isinstance(container, dict)
    return container


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --------------------------------------------------------------------------- settings


def test_allowed_env_derives_from_settings() -> None:
    allowed = allowed_env()
    missing = DOCUMENTED_VARS - allowed
    assert not missing, f"documented variables that no settings class reads: {sorted(missing)}"
    # Derivation rules: an alias is used as is, otherwise prefix + field name.
    assert "DATABASE_URL" in allowed
    assert "SENDER_FROM_EMAIL" in allowed
    assert "FROM_EMAIL" not in allowed


# --------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    found: list[tuple[str, str]] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, rest = stripped.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_is_multistage_slim_and_non_root() -> None:
    instructions = dockerfile_instructions()
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    bases = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            image = rest.split()[0]
            bases.append(re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), image))
    assert len(bases) >= 2, "the Dockerfile must be multi-stage"
    assert all(base == "python:3.11-slim" for base in bases), bases
    assert any(
        keyword == "RUN" and re.search(r"pip install\b.*\s\.(\s|$)", rest)
        for keyword, rest in instructions
    ), "the package must be installed with `pip install .`"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "the image must switch to a non-root user"
    assert users[-1].split(":")[0] not in {"root", "0"}


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    instructions = dockerfile_instructions()
    entrypoints = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    cmds = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    assert entrypoints and entrypoints[-1] == ["touchstream"]
    assert cmds and cmds[-1] == ["run", "router"]
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "touchstream" in pyproject["project"]["scripts"], "no `touchstream` console script"


def test_dockerignore_excludes_local_state() -> None:
    lines = {
        line.strip().rstrip("/")
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".venv", ".git", ".touchstream", "**/__pycache__", ".env"):
        assert entry in lines, f".dockerignore should exclude {entry}"


# --------------------------------------------------------------------------- topics.yaml


def test_topics_match_the_registry() -> None:
    expected = _import("schemas.topics").all_topics()
    assert sorted(topics_spec()) == sorted(expected)
    primaries = {topic for topic in expected if not topic.endswith("-dlq")}
    assert set(expected) == primaries | {f"{topic}-dlq" for topic in primaries}
    consumed = set().union(*CONSUMES.values())
    assert consumed == primaries, "every topic has a consumer, every consumed topic exists"


def test_topics_create_applies_the_cleanup_policy_of_topics_yaml() -> None:
    """`touchstream topics create` sets what topics.yaml sets beyond the defaults."""
    configs = _import("schemas.topics").CONFIGS
    for name, spec in topics_spec().items():
        policy = spec["config"]["cleanup.policy"]
        assert configs.get(name, {}).get("cleanup.policy", "delete") == policy, name


def test_topic_definitions_are_sound() -> None:
    for name, spec in topics_spec().items():
        assert isinstance(spec["partitions"], int) and spec["partitions"] >= 1, name
        rf = spec["replication_factor"]
        assert isinstance(rf, int) and rf >= 1, name
        config = spec["config"]
        assert int(config["retention.ms"]) > 0, name
        assert config["cleanup.policy"] in {"delete", "compact", "compact,delete"}, name
        # acks=all producers fail as soon as one replica is down otherwise.
        assert int(config["min.insync.replicas"]) < rf, name
        if name.endswith("-dlq"):
            source = topics_spec()[name.removesuffix("-dlq")]
            assert int(config["retention.ms"]) > int(source["config"]["retention.ms"]), (
                f"{name} must be kept longer than its source topic"
            )


def test_webhook_topic_fits_the_tracker_body_limit() -> None:
    topic_limit = int(topics_spec()["webhooks-raw"]["config"]["max.message.bytes"])
    assert int(topics_spec()["webhooks-raw-dlq"]["config"]["max.message.bytes"]) == topic_limit
    limit = min(topic_limit, PRODUCER_MAX_REQUEST_BYTES)
    tracker_env = compose_env(run_services()["tracker"])
    for where, body in (
        ("k8s ConfigMap", configmap_data()["TRACKER_MAX_BODY_BYTES"]),
        ("compose", tracker_env["TRACKER_MAX_BODY_BYTES"]),
    ):
        # A quarter of headroom for the JSON envelope and escaping.
        assert int(body) * 5 // 4 <= limit, f"{where}: TRACKER_MAX_BODY_BYTES too large"
    broker_limits = {
        compose_env(service).get("KAFKA_MESSAGE_MAX_BYTES")
        for service in compose_services().values()
        if not compose_is_touchstream(service) and "KAFKA_NODE_ID" in compose_env(service)
    }
    assert broker_limits == {str(topic_limit)}, broker_limits


# --------------------------------------------------------------------------- compose


def test_compose_has_the_whole_stack() -> None:
    services = compose_services()
    for required in ("postgres", "mailpit", "topics", "migrate"):
        assert required in services, f"compose.yaml lacks {required}"
    assert set(run_services()) == set(SERVICE_PORTS)
    assert str(services["postgres"]["image"]).startswith("postgres:16")
    assert image_repo(str(services["mailpit"]["image"])) == "mailpit"


def test_compose_kafka_is_kraft() -> None:
    brokers = {
        name: compose_env(service)
        for name, service in compose_services().items()
        if str(service.get("image", "")).startswith("apache/kafka:")
    }
    assert len(brokers) in {1, 3}, f"expected 1 or 3 Kafka nodes, got {sorted(brokers)}"
    cluster_ids = {env.get("CLUSTER_ID") for env in brokers.values()}
    assert len(cluster_ids) == 1 and None not in cluster_ids
    node_ids = {env["KAFKA_NODE_ID"] for env in brokers.values()}
    assert len(node_ids) == len(brokers), "KAFKA_NODE_ID must be unique"
    for name, env in brokers.items():
        assert "controller" in env["KAFKA_PROCESS_ROLES"], name
        voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
        assert len(voters) == len(brokers), name
        assert {v.split("@")[0] for v in voters} == node_ids, name
    bootstrap = {
        compose_env(service)["KAFKA_BOOTSTRAP_SERVERS"]
        for service in compose_services().values()
        if compose_is_touchstream(service)
    }
    assert len(bootstrap) == 1
    hosts = {server.split(":")[0] for server in bootstrap.pop().split(",")}
    assert hosts <= set(brokers), f"bootstrap servers {hosts} are not compose services"


def test_compose_env_names_are_known() -> None:
    allowed = allowed_env()
    for name, service in compose_services().items():
        env = compose_env(service)
        if compose_is_touchstream(service):
            unknown = set(env) - allowed
            assert not unknown, f"{name}: unknown touchstream variables {sorted(unknown)}"
        else:
            unknown = {key for key in env if not THIRD_PARTY_ENV.match(key)}
            assert not unknown, f"{name}: unexpected variables {sorted(unknown)}"


def test_compose_interpolated_variables_are_known() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8").replace("$$", "")
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    assert used, "compose.yaml should take its secrets from the environment"
    unknown = {var for var in used if var not in allowed_env() and not THIRD_PARTY_ENV.match(var)}
    assert not unknown, f"unknown interpolated variables {sorted(unknown)}"


def test_compose_secrets_are_required_not_defaulted() -> None:
    for name, service in compose_services().items():
        for key, value in compose_env(service).items():
            if key in SECRET_VARS or key == "POSTGRES_PASSWORD":
                assert re.fullmatch(rf"\$\{{{key}:\?[^}}]*\}}", value), (
                    f"{name}: {key} must be `${{{key}:?...}}`, not a literal or a default"
                )
            if key == "DATABASE_URL":
                assert "${POSTGRES_PASSWORD:?" in value, f"{name}: DATABASE_URL embeds a password"
    sender = compose_env(run_services()["sender"])
    tracker = compose_env(run_services()["tracker"])
    assert sender["TOUCHSTREAM_TRACKING_SECRET"] == tracker["TOUCHSTREAM_TRACKING_SECRET"]
    assert "TRACKER_INBOUND_TOKEN" in tracker
    # notify webhooks are never sent unsigned: nurture must get its secret.
    assert "NURTURE_WEBHOOK_SECRET" in compose_env(run_services()["nurture"])


def test_compose_touchstream_commands() -> None:
    seen: list[tuple[str, ...]] = []
    for name, service in compose_services().items():
        if not compose_is_touchstream(service):
            continue
        command = compose_command(service)
        seen.append(command)
        if command[:1] == ("run",):
            assert len(command) == 2 and command[1] in SERVICE_PORTS, f"{name}: {command}"
            assert name == command[1], f"compose service {name} runs {command[1]}"
        else:
            assert command in ONE_SHOT_COMMANDS, f"{name}: unexpected command {command}"
            assert service.get("restart", "no") == "no", f"{name} is one-shot"
        build = service.get("build")
        assert isinstance(build, dict), f"{name}: build from deploy/Dockerfile"
        assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == (
            DOCKERFILE.resolve()
        )
    assert sorted(seen) == sorted([("run", s) for s in SERVICE_PORTS] + list(ONE_SHOT_COMMANDS))


def test_compose_ports_and_healthchecks() -> None:
    for service_name, service in run_services().items():
        port = SERVICE_PORTS[service_name]
        env = compose_env(service)
        assert env.get(f"{service_name.upper()}_HTTP_PORT") == str(port), service_name
        test = service["healthcheck"]["test"]
        command = " ".join(test) if isinstance(test, list) else str(test)
        assert "curl" not in command and "wget" not in command, "the slim image has neither"
        assert "urllib" in command, service_name
        assert re.findall(r":(\d+)/readyz", command) == [str(port)], command
        for exposed in service.get("expose") or []:
            assert int(str(exposed).split("/")[0]) == port, service_name
        for published in service.get("ports") or []:
            container_port = str(published).split("/")[0].rsplit(":", 1)[-1]
            assert int(container_port) == port, service_name


def test_compose_dependencies() -> None:
    services = compose_services()

    def conditions(service: dict[str, Any]) -> dict[str, str]:
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), "depends_on must state conditions"
        for target in depends:
            assert target in services, f"depends_on an unknown service {target}"
        return {target: spec["condition"] for target, spec in depends.items()}

    kafka_nodes = [n for n, s in services.items() if "apache/kafka" in str(s.get("image"))]
    topics = conditions(services["topics"])
    assert all(topics.get(node) == "service_healthy" for node in kafka_nodes), topics
    assert conditions(services["migrate"]).get("postgres") == "service_healthy"
    for name, service in run_services().items():
        deps = conditions(service)
        assert deps.get("topics") == "service_completed_successfully", name
        assert deps.get("migrate") == "service_completed_successfully", name
        assert deps.get("postgres") == "service_healthy", name
    assert "mailpit" in conditions(run_services()["sender"])
    assert "healthcheck" in services["postgres"]
    assert all("healthcheck" in services[node] for node in kafka_nodes)


def test_compose_replicas_fit_the_partitions() -> None:
    workers = run_services()
    partitions_env = {compose_env(s)["TOUCHSTREAM_TOPIC_PARTITIONS"] for s in workers.values()}
    assert len(partitions_env) == 1
    created = int(partitions_env.pop())
    for name in ("nurture", "sender"):
        assert int(workers[name]["deploy"]["replicas"]) >= 2, name
    for name, service in workers.items():
        replicas = int((service.get("deploy") or {}).get("replicas", 1))
        assert replicas <= created, f"{name}: {replicas} replicas, {created} partitions"


# --------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_parse_and_are_namespaced() -> None:
    kinds = {doc["kind"] for _, doc in k8s_docs()}
    for required in (
        "Namespace", "ConfigMap", "Secret", "Deployment", "Service", "Job",
        "ScaledObject", "HorizontalPodAutoscaler", "PodDisruptionBudget",
    ):  # fmt: skip
        assert required in kinds, f"deploy/k8s lacks a {required}"
    for file_name, doc in k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), file_name
        if doc["kind"] in CLUSTER_SCOPED_KINDS:
            continue
        assert doc["metadata"].get("namespace") == NAMESPACE, (
            f"{file_name}: {doc['kind']}/{doc['metadata'].get('name')} is not in {NAMESPACE}"
        )
    assert k8s_named("Namespace", NAMESPACE)


def test_k8s_kustomization_lists_everything_but_the_secret_template() -> None:
    (kustomization,) = k8s_kind("Kustomization")
    listed = set(kustomization["resources"])
    on_disk = {path.name for path in k8s_files()} - {"kustomization.yaml", "secret.yaml"}
    assert listed == on_disk
    template = [doc for name, doc in k8s_docs() if name == "secret.yaml"]
    assert template and all(doc["kind"] == "Secret" for doc in template)


def test_k8s_configmap_and_secrets_hold_known_variables() -> None:
    allowed = allowed_env()
    data = configmap_data()
    unknown = set(data) - allowed
    assert not unknown, f"ConfigMap: unknown variables {sorted(unknown)}"
    for key, value in data.items():
        assert isinstance(value, str) and value, (
            f"ConfigMap {key}: values must be non-empty strings"
        )
    leaked = (SECRET_VARS | {"DATABASE_URL"}) & set(data)
    assert not leaked, f"secrets in the ConfigMap: {sorted(leaked)}"
    secret_keys: set[str] = set()
    for secret in k8s_kind("Secret"):
        keys = set(secret_data(secret))
        unknown = keys - allowed
        assert not unknown, f"Secret {secret['metadata']['name']}: unknown {sorted(unknown)}"
        secret_keys |= keys
    assert secret_keys == SECRET_VARS | {"DATABASE_URL"}
    for service, port in SERVICE_PORTS.items():
        assert data[f"{service.upper()}_HTTP_PORT"] == str(port)


def test_k8s_container_env_is_known_and_resolvable() -> None:
    allowed = allowed_env()
    configmaps = {doc["metadata"]["name"]: doc.get("data") or {} for doc in k8s_kind("ConfigMap")}
    secrets = {doc["metadata"]["name"]: secret_data(doc) for doc in k8s_kind("Secret")}
    checked = 0
    for workload, pod_spec in pod_specs():
        assert pod_spec.get("enableServiceLinks") is False, (
            f"{workload}: service links would inject *_PORT / *_SERVICE_HOST variables"
        )
        for container in containers(pod_spec):
            if not is_touchstream_container(container):
                continue
            checked += 1
            for entry in container.get("env") or []:
                assert entry["name"] in allowed, f"{workload}: unknown variable {entry['name']}"
                ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], f"{workload}: {ref}"
            for source in container.get("envFrom") or []:
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in configmaps, workload
                if "secretRef" in source:
                    assert source["secretRef"]["name"] in secrets, workload
    assert checked >= len(SERVICE_PORTS) + len(ONE_SHOT_COMMANDS)


def test_k8s_commands() -> None:
    seen: list[tuple[str, ...]] = []
    for workload, pod_spec in pod_specs():
        for container in containers(pod_spec):
            if not is_touchstream_container(container):
                continue
            assert "command" not in container, f"{workload}: keep the image's ENTRYPOINT"
            args = tuple(container["args"])
            seen.append(args)
            if args[:1] == ("run",):
                assert len(args) == 2 and args[1] in SERVICE_PORTS, f"{workload}: {args}"
                assert workload == f"Deployment/touchstream-{args[1]}", workload
            else:
                assert args in ONE_SHOT_COMMANDS, f"{workload}: unexpected args {args}"
                assert workload.startswith("Job/"), workload
                assert pod_spec["restartPolicy"] in {"Never", "OnFailure"}
    assert sorted(seen) == sorted([("run", s) for s in SERVICE_PORTS] + list(ONE_SHOT_COMMANDS))


@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_k8s_deployment(service: str) -> None:
    port = SERVICE_PORTS[service]
    doc = deployment(service)
    pod = doc["spec"]["template"]
    assert selects(doc["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    spec = pod["spec"]
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["securityContext"]["runAsNonRoot"] is True
    container = only_container(doc)
    assert container["args"] == ["run", service]
    assert [p["containerPort"] for p in container["ports"]] == [port]
    probes = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe_name, path in probes.items():
        probe = container.get(probe_name)
        if probe is None and probe_name == "startupProbe":
            continue
        assert probe is not None, f"{service}: no {probe_name}"
        assert probe["httpGet"]["path"] == path, f"{service}: {probe_name}"
        assert resolve_port(container, probe["httpGet"]["port"]) == port, f"{service}"
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    env_from = {
        next(iter(source.values()))["name"]: next(iter(source)) for source in container["envFrom"]
    }
    assert env_from.get("touchstream-config") == "configMapRef"
    assert "secretRef" in env_from.values()


@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_k8s_service_and_pdb(service: str) -> None:
    port = SERVICE_PORTS[service]
    doc = deployment(service)
    pod_labels = doc["spec"]["template"]["metadata"]["labels"]
    container = only_container(doc)
    services = [s for s in k8s_kind("Service") if selects(s["spec"]["selector"], pod_labels)]
    assert len(services) == 1, f"{service}: expected one Service"
    (service_port,) = services[0]["spec"]["ports"]
    assert service_port["port"] == port
    assert resolve_port(container, service_port.get("targetPort", port)) == port
    pdbs = [
        p
        for p in k8s_kind("PodDisruptionBudget")
        if selects(p["spec"]["selector"]["matchLabels"], pod_labels)
    ]
    assert len(pdbs) == 1, f"{service}: expected one PodDisruptionBudget"
    assert "maxUnavailable" in pdbs[0]["spec"] or "minAvailable" in pdbs[0]["spec"]


def test_k8s_each_service_has_exactly_one_autoscaler() -> None:
    targets = [doc["spec"]["scaleTargetRef"]["name"] for doc in k8s_kind("ScaledObject")]
    targets += [
        doc["spec"]["scaleTargetRef"]["name"] for doc in k8s_kind("HorizontalPodAutoscaler")
    ]
    assert sorted(targets) == sorted(f"touchstream-{s}" for s in SERVICE_PORTS)
    for service in SERVICE_PORTS:
        assert "replicas" not in deployment(service)["spec"], (
            f"{service}: the autoscaler owns the replica count"
        )


def test_k8s_keda_scales_on_consumer_lag_within_partitions() -> None:
    scaled = {doc["spec"]["scaleTargetRef"]["name"]: doc for doc in k8s_kind("ScaledObject")}
    assert set(scaled) == {"touchstream-router", "touchstream-nurture", "touchstream-sender"}
    for target, doc in scaled.items():
        service = target.removeprefix("touchstream-")
        spec = doc["spec"]
        topics: set[str] = set()
        for trigger in spec["triggers"]:
            assert trigger["type"] == "kafka", target
            meta = trigger["metadata"]
            assert meta["consumerGroup"] == f"touchstream-{service}", target
            assert int(meta["lagThreshold"]) > 0, target
            assert str(meta.get("allowIdleConsumers", "false")).lower() == "false", target
            # The consumers start from the earliest offset; lag must be counted alike.
            assert meta.get("offsetResetPolicy") == "earliest", target
            if "bootstrapServersFromEnv" in meta:
                assert meta["bootstrapServersFromEnv"] in configmap_data(), target
            else:
                assert meta["bootstrapServers"], target
            partitions(meta["topic"])  # declared in topics.yaml
            topics.add(meta["topic"])
        assert topics == CONSUMES[service], f"{target}: triggers on {sorted(topics)}"
        # Members beyond the partition count of every consumed topic sit idle:
        # the bound is the largest partition count among the group's topics
        # (KEDA additionally caps each trigger at its own topic's partitions).
        bound = max(partitions(topic) for topic in topics)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= bound, target


def test_k8s_tracker_hpa_on_cpu() -> None:
    (hpa,) = k8s_kind("HorizontalPodAutoscaler")
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "touchstream-tracker",
    }
    metrics = [m["resource"]["name"] for m in spec["metrics"] if m["type"] == "Resource"]
    assert metrics == ["cpu"]
    bound = max(partitions(topic) for topic in CONSUMES["tracker"])
    assert 1 <= spec["minReplicas"] <= spec["maxReplicas"] <= bound
    requests = only_container(deployment("tracker"))["resources"]["requests"]
    assert requests["cpu"], "CPU utilisation needs a CPU request"


def test_k8s_topics_job_covers_the_largest_topic() -> None:
    largest = max(spec["partitions"] for spec in topics_spec().values())
    assert int(configmap_data()["TOUCHSTREAM_TOPIC_PARTITIONS"]) >= largest
    replication = int(configmap_data()["TOUCHSTREAM_TOPIC_REPLICATION"])
    assert {spec["replication_factor"] for spec in topics_spec().values()} == {replication}


# --------------------------------------------------------------------------- README


def test_readme_documents_every_variable() -> None:
    text = README.read_text(encoding="utf-8")
    table_vars = set(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]+)`\s*\|", text, flags=re.MULTILINE))
    missing = DOCUMENTED_VARS - table_vars
    assert not missing, f"README env table lacks {sorted(missing)}"
    unknown = {v for v in table_vars if v not in allowed_env() and not THIRD_PARTY_ENV.match(v)}
    assert not unknown, f"README documents unknown variables {sorted(unknown)}"
    for command in ("touchstream dlq replay", "touchstream migrate", "touchstream topics create"):
        assert command in text, f"README should show `{command}`"
