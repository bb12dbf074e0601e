"""The deployment files: Dockerfile, docker-compose.yml, RabbitMQ, Kubernetes, Prometheus, Grafana.

Offline validators from PyPI do the format checks: ``compose-spec`` (the Rust compose_spec
parser) for the compose file, ``kubernetes-validate`` (the Kubernetes JSON schemas it bundles)
for the manifests, ``promql-parser`` (the Rust PromQL parser) for every query.  ``promtool`` and
``kubectl`` are used too when they are installed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import promql_parser
import pytest
import yaml
from compose_spec import PyCompose

from worker.app.topology import (
    command_queue_arguments,
    dead_queue_arguments,
    partitioned_queue_arguments,
)
from worker.sandbox.fixtures import Fixtures
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OPS = ROOT / "ops"
K8S = OPS / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEFINITIONS = OPS / "rabbitmq" / "definitions.json"
LOCAL_USERS = OPS / "rabbitmq" / "local-users.json"
ALERTS = OPS / "prometheus" / "alerts.yml"
DASHBOARD = OPS / "grafana" / "dashboards" / "conference-worker.json"

GRACE_S = 30  # `run --grace-s 30` everywhere: the worker's shutdown budget
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

# The worker's metrics (its fixed interface), histograms with their series suffixes.
WORKER_METRICS = {
    "conference_worker_commands_total",
    "conference_worker_duplicates_total",
    "conference_worker_retries_total",
    "conference_worker_dead_letters_total",
    "conference_worker_inflight",
    "conference_worker_breaker_state",
    "conference_worker_ready",
}
WORKER_HISTOGRAMS = {
    "conference_worker_provider_request_duration_seconds",
    "conference_worker_command_age_seconds",
}
KNOWN_METRICS = WORKER_METRICS | {
    f"{name}{suffix}" for name in WORKER_HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")
}

PINNED_BY_DIGEST = re.compile(
    r"^[a-z0-9][a-z0-9._/-]*:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]*)@sha256:[0-9a-f]{64}$"
)
EXPLICIT_TAG = re.compile(r"^[a-z0-9][a-z0-9._/-]*:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]*)$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}


# ---------------------------------------------------------------------------------------------
# helpers


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@cache
def _compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, Any]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _interpolate(text: str) -> str:
    """What `docker compose config` does to ``${VAR:-default}`` with nothing set."""
    text = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", text)
    return re.sub(r"\$\{\w+\}", "", text).replace("$$", "$")


@cache
def _k8s_documents() -> tuple[tuple[str, dict[str, Any]], ...]:
    """Every Kubernetes object in ops/k8s (file name, object); kustomization.yaml aside."""
    found: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                found.append((path.name, document))
    return tuple(found)


def _k8s_object(kind: str, name: str = "conference-worker") -> dict[str, Any]:
    matches = [
        doc
        for _, doc in _k8s_documents()
        if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"expected one {kind}/{name} in ops/k8s, found {len(matches)}"
    return matches[0]


def _worker_container() -> dict[str, Any]:
    containers = _k8s_object("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container = containers[0]
    assert isinstance(container, dict)
    return container


def _alert_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = []
    for group in _load_yaml(ALERTS)["groups"]:
        rules.extend(group["rules"])
    return rules


def _dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _dashboard_queries() -> Iterator[str]:
    for panel in _dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield target["expr"]


def _grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def _metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name is not None:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def _conf(path: Path) -> dict[str, str]:
    """A rabbitmq.conf (sysctl format) as key -> value."""
    settings: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def _volume_targets(service: str) -> dict[str, str]:
    """Container path -> host path of a service's bind mounts."""
    mounts: dict[str, str] = {}
    for volume in _services()[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


# ---------------------------------------------------------------------------------------------
# docker compose


def test_compose_file_follows_the_compose_specification() -> None:
    """docker-compose.yml parses under the strict compose_spec parser (like `compose config`)."""
    text = _interpolate(COMPOSE_FILE.read_text())
    # compose_spec refuses `name:tag@digest` although Docker accepts it (the digest wins): give
    # it the digest alone; the pinning test below checks that the tag is there too.
    text = re.sub(r"(image: [^\s:@]+):[^\s@]+@", r"\1@", text)
    compose = PyCompose.from_yaml(text)
    assert set(compose.service_names()) == set(_services())


def test_compose_brings_up_every_required_service() -> None:
    """RabbitMQ, Redis, the sandbox, the worker, a trace viewer, Prometheus and Grafana."""
    assert _compose()["name"] == "conference-worker"
    assert set(_services()) >= {
        "rabbitmq",
        "redis",
        "sandbox",
        "worker",
        "jaeger",
        "prometheus",
        "grafana",
    }
    assert "management" in _services()["rabbitmq"]["image"]


def test_every_compose_image_is_pinned() -> None:
    """Pulled images name a version and a digest; the locally built one a tag other than latest."""
    for name, service in _services().items():
        image = service["image"]
        if "build" in service:
            match = EXPLICIT_TAG.match(image)
            assert match, f"{name}: {image} has no explicit tag"
        else:
            match = PINNED_BY_DIGEST.match(image)
            assert match, f"{name}: {image} is not pinned as name:version@sha256:digest"
            assert any(char.isdigit() for char in match["tag"]), f"{name}: {image}"
        assert match["tag"] != "latest", f"{name}: {image}"


def test_worker_waits_for_healthy_broker_store_and_sandbox() -> None:
    """The worker starts after RabbitMQ, Redis and the sandbox report healthy."""
    services = _services()
    depends = services["worker"]["depends_on"]
    for dependency in ("rabbitmq", "redis", "sandbox"):
        assert depends[dependency] == {"condition": "service_healthy"}
        assert services[dependency]["healthcheck"]["test"], dependency


def test_compose_worker_runs_against_the_local_stack() -> None:
    """Three replicas on the 16 partitions share Redis, use the sandbox's fixed keys and get time
    to drain on stop."""
    worker = _services()["worker"]
    env = worker["environment"]
    fixtures = Fixtures.generate(1)
    assert worker["deploy"]["replicas"] == 3
    assert env["CW_PARTITIONS"] == str(Settings().partitions) == "16"
    assert worker["command"] == ["run", "--grace-s", str(GRACE_S)]
    assert int(worker["stop_grace_period"].removesuffix("s")) > GRACE_S
    assert env["CW_AMQP_URL"].startswith("amqp://guest:guest@rabbitmq:5672/")
    assert env["CW_DEDUP_URL"].startswith("redis://redis:6379/")
    assert env["CW_VINIX_API_KEY"] == fixtures.vinix.api_key
    assert env["CW_TELNYX_API_KEY"] == fixtures.telnyx.api_key
    assert env["CW_VINIX_BASE_URL"].startswith("http://sandbox:8090/")
    assert env["CW_TELNYX_BASE_URL"].startswith("http://sandbox:8090/")
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://jaeger:43")
    assert _services()["sandbox"]["command"][-1] == "8090"


def test_compose_bind_mounts_exist() -> None:
    """Every file or directory mounted from the repository is there."""
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


# ---------------------------------------------------------------------------------------------
# RabbitMQ


def test_rabbitmq_imports_the_definitions_at_boot_with_its_plugins() -> None:
    """rabbitmq.conf imports the mounted definitions directory; management + prometheus on."""
    mounts = _volume_targets("rabbitmq")
    conf_source = mounts["/etc/rabbitmq/rabbitmq.conf"]
    conf = _conf(ROOT / conf_source)
    assert conf["definitions.import_backend"] == "local_filesystem"
    directory = conf["definitions.local.path"]
    imported = {
        Path(target).name: source
        for target, source in mounts.items()
        if Path(target).parent == Path(directory)
    }
    # File-name order: the vhost and its user exist before the topology is imported into it.
    assert [imported[name] for name in sorted(imported)] == [
        "./ops/rabbitmq/local-users.json",
        "./ops/rabbitmq/definitions.json",
    ]
    assert all(name.endswith(".json") for name in imported)
    assert conf["loopback_users.guest"] == "false"
    plugins_file = (ROOT / mounts["/etc/rabbitmq/enabled_plugins"]).read_text().strip()
    match = re.fullmatch(r"\[([a-z_,\s]*)\]\.", plugins_file)
    assert match, plugins_file
    plugins = {plugin.strip() for plugin in match[1].split(",")}
    # The partitioned topology's partitions exchange is an x-consistent-hash exchange.
    assert plugins >= {
        "rabbitmq_management",
        "rabbitmq_prometheus",
        "rabbitmq_consistent_hash_exchange",
    }
    assert conf["prometheus.tcp.port"] == "15692"


def test_local_users_file_holds_the_compose_login() -> None:
    """guest/guest on "/" for the local stack only (definitions import skips the default user)."""
    local = json.loads(LOCAL_USERS.read_text())
    assert {vhost["name"] for vhost in local["vhosts"]} == {"/"}
    (user,) = local["users"]
    assert user["name"] == "guest"
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(user["password_hash"])
    salt, digest = raw[:4], raw[4:]
    assert hashlib.sha256(salt + b"guest").digest() == digest
    (permission,) = local["permissions"]
    assert permission == {
        "user": "guest",
        "vhost": "/",
        "configure": ".*",
        "write": ".*",
        "read": ".*",
    }


def test_definitions_hold_topology_only() -> None:
    """definitions.json creates no user and touches no vhost, so any broker can import it."""
    definitions = json.loads(DEFINITIONS.read_text())
    assert not {"users", "permissions", "vhosts", "topic_permissions"} & set(definitions)
    assert {"exchanges", "queues", "bindings", "policies"} <= set(definitions)


def test_policies_only_restate_what_the_worker_declares() -> None:
    """Each policy matches the intake and the partitions alone and agrees with their
    x-arguments (the definitions hold the default, partitioned topology)."""
    topology = Settings().topology()
    definitions = json.loads(DEFINITIONS.read_text())
    queues = {queue["name"]: queue["arguments"] for queue in definitions["queues"]}
    work = [topology.intake_queue, *topology.partition_queues()]
    for name in work:
        assert queues[name] == partitioned_queue_arguments(topology), name
    assert queues[topology.dead_queue] == dead_queue_arguments()
    assert definitions["policies"], "definitions.json ships the operators' default policy"
    for policy in definitions["policies"]:
        pattern = re.compile(policy["pattern"])
        assert policy["apply-to"] == "queues"
        assert all(pattern.search(name) for name in work)
        # Never the dead-letter queue (a DLX there would loop), nor the delay tiers.
        others = (topology.dead_queue, topology.delay_queue(5), f"{topology.intake_queue}x", "x")
        for other in others:
            assert not pattern.search(other), f"{policy['name']} matches {other}"
        declared = command_queue_arguments(topology)
        for key, value in policy["definition"].items():
            assert declared[f"x-{key}"] == value, f"{policy['name']}: {key}"


# ---------------------------------------------------------------------------------------------
# Dockerfile


def test_dockerfile_is_multi_stage_pinned_non_root_with_a_healthcheck() -> None:
    """Pinned base by digest, a separate build stage, numeric non-root user, /healthz check."""
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base, "the base image is one ARG, used by both stages"
    assert PINNED_BY_DIGEST.match(base[1]), base[1]
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert stages == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    final = text.split("\nFROM ")[-1]
    user = re.search(r"^USER (\d+)(?::(\d+))?$", final, re.MULTILINE)
    assert user, "the final stage runs as a numeric user"
    assert int(user[1]) != 0
    assert "COPY --from=build /opt/venv /opt/venv" in final
    assert not re.search(r"apt-get|gcc|build-essential", final)
    healthcheck = re.search(r"^HEALTHCHECK .*\n.*$", final, re.MULTILINE)
    assert healthcheck
    assert "urllib.request" in healthcheck[0]
    assert "/healthz" in healthcheck[0]
    assert f'CMD ["run", "--grace-s", "{GRACE_S}"]' in final


def test_dockerignore_sends_only_what_the_build_needs() -> None:
    """An allow-list: no .git, .venv or .env file ever reaches the build context."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "worker/"}


# ---------------------------------------------------------------------------------------------
# Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    """Every built-in object validates (strict: no unknown field) against Kubernetes' schemas."""
    validated = 0
    for filename, document in _k8s_documents():
        if document["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: test_keda_scaled_object checks it
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{filename}: {document['kind']}: {path}: {exc.message}")
        validated += 1
    assert validated >= 6


def test_manifests_are_namespace_agnostic_and_labelled() -> None:
    """No object pins a namespace; every one carries the app name label."""
    for filename, document in _k8s_documents():
        metadata = document["metadata"]
        assert "namespace" not in metadata, filename
        assert metadata["labels"]["app.kubernetes.io/name"] == "conference-worker", filename


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    """kustomization.yaml names each manifest once; the placeholder Secret is never applied."""
    kustomization = _load_yaml(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert "namespace" not in kustomization
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources))
    files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == files - {"secret.example.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomization_builds_with_kubectl() -> None:
    """`kubectl kustomize ops/k8s` renders every object (offline)."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    kinds = sorted(doc["kind"] for doc in yaml.safe_load_all(out) if doc)
    assert kinds == sorted(
        doc["kind"] for name, doc in _k8s_documents() if name != "secret.example.yaml"
    )


def test_deployment_probes_and_graceful_termination() -> None:
    """Liveness on /healthz, readiness on /readyz, and more grace than the worker's --grace-s."""
    pod = _k8s_object("Deployment")["spec"]["template"]["spec"]
    container = _worker_container()
    assert container["args"] == ["run", "--grace-s", str(GRACE_S)]
    assert pod["terminationGracePeriodSeconds"] > GRACE_S
    assert "lifecycle" not in container  # SIGTERM is handled: no preStop sleep needed
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    config = _k8s_object("ConfigMap")["data"]
    assert int(config["CW_HTTP_PORT"]) == ports["http"]
    service_port = _k8s_object("Service")["spec"]["ports"][0]
    assert service_port["targetPort"] == "http"


def test_deployment_is_locked_down() -> None:
    """Non-root, read-only root filesystem, no privilege escalation, resources set."""
    deployment = _k8s_object("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _worker_container()
    assert "replicas" not in deployment["spec"]  # the ScaledObject owns the count
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    assert EXPLICIT_TAG.match(container["image"])
    assert not container["image"].endswith(":latest")


def test_deployment_reads_its_settings_from_the_configmap_and_secret() -> None:
    """envFrom names the ConfigMap and the Secret; secrets live only in the Secret."""
    container = _worker_container()
    sources = {
        next(iter(source)): next(iter(source.values()))["name"] for source in container["envFrom"]
    }
    config = _k8s_object("ConfigMap", sources["configMapRef"])["data"]
    secret = _k8s_object("Secret", sources["secretRef"])
    secret_keys = {
        "CW_AMQP_URL",
        "CW_DEDUP_URL",
        "CW_VINIX_API_KEY",
        "CW_TELNYX_API_KEY",
        "CW_RABBITMQ_MANAGEMENT_URL",  # KEDA's, not the worker's (keda.yaml)
    }
    assert set(secret["stringData"]) == secret_keys
    assert not secret_keys & set(config)
    assert all("CHANGE-ME" in value for value in secret["stringData"].values())
    assert secret["stringData"]["CW_DEDUP_URL"].startswith(("redis://", "rediss://"))
    # With a base URL unset the worker would start its built-in sandbox.
    assert config["CW_VINIX_BASE_URL"].startswith("https://")
    assert config["CW_TELNYX_BASE_URL"].startswith("https://")
    assert int(config["CW_PARTITIONS"]) == Settings().partitions


def test_pod_disruption_budget_keeps_one_worker() -> None:
    """minAvailable 1, selecting exactly the Deployment's pods."""
    pdb = _k8s_object("PodDisruptionBudget")
    deployment = _k8s_object("Deployment")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


# The part of KEDA's ScaledObject / TriggerAuthentication CRD schemas (keda.sh/v1alpha1) these
# manifests use, closed to unknown fields so that a misspelt key fails.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
SCALED_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {
                        "failureThreshold": {"type": "integer"},
                        "replicas": {"type": "integer"},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {}},
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": _STRING_MAP,
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
TRIGGER_AUTHENTICATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["secretTargetRef"],
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["parameter", "name", "key"],
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string"},
                            "key": {"type": "string"},
                        },
                    },
                }
            },
        },
    },
}


def test_keda_scaled_object_scales_the_deployment_on_the_command_queues() -> None:
    """ScaledObject: rabbitmq trigger over the management API, QueueLength summed over the intake
    and every partition (a regex), credentials by Secret, at most one replica per partition."""
    scaled = _k8s_object("ScaledObject")
    jsonschema.validate(scaled, SCALED_OBJECT_SCHEMA)
    deployment = _k8s_object("Deployment")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": deployment["kind"],
        "name": deployment["metadata"]["name"],
    }
    pdb = _k8s_object("PodDisruptionBudget")
    topology = Settings().topology()
    config = _k8s_object("ConfigMap")["data"]
    assert spec["minReplicaCount"] > pdb["spec"]["minAvailable"]
    # Replicas beyond P (+1 for the intake, shared with a partition) would only stand by.
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"] <= int(config["CW_PARTITIONS"])
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "rabbitmq"
    metadata = trigger["metadata"]
    # A queue-name regex needs the management API (KEDA: useRegex only with protocol http).
    assert metadata["protocol"] == "http"
    assert metadata["useRegex"] == "true"
    assert metadata["operation"] == "sum"
    pattern = re.compile(metadata["queueName"])
    for name in (topology.intake_queue, *topology.partition_queues(), topology.partition_queue(99)):
        assert pattern.fullmatch(name), name
    delays = [topology.delay_queue(seconds) for seconds in topology.delay_tiers_s]
    for name in (topology.dead_queue, topology.commands_queue, *delays):
        assert not pattern.fullmatch(name), name
    assert metadata["mode"] == "QueueLength"
    assert float(metadata["value"]) > 0
    assert "host" not in metadata  # never a URL with a password in a manifest

    auth = _k8s_object("TriggerAuthentication", trigger["authenticationRef"]["name"])
    jsonschema.validate(auth, TRIGGER_AUTHENTICATION_SCHEMA)
    (ref,) = auth["spec"]["secretTargetRef"]
    secret = _k8s_object("Secret", ref["name"])
    assert ref["parameter"] == "host"
    assert secret["stringData"][ref["key"]].startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------------
# Prometheus and Grafana


def test_alert_rules_are_well_formed() -> None:
    """Every rule has alert, a PromQL expr that parses, for, a severity and a summary."""
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        name = rule["alert"]
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, name
        try:
            promql_parser.parse(rule["expr"])
        except ValueError as exc:
            pytest.fail(f"{name}: expr does not parse: {exc}")
        assert promql_parser.parse_duration(rule["for"]).total_seconds() > 0, name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert all(LABEL_NAME.match(label) for label in rule["labels"]), name
        assert rule["annotations"]["summary"].strip(), name
        for text in rule["annotations"].values():
            assert text.count("{{") == text.count("}}"), f"{name}: unbalanced template"


def test_the_required_alerts_exist() -> None:
    """Dead letters growing, breaker open, no consumer, queue age, worker not ready."""
    rules = {rule["alert"]: rule for rule in _alert_rules()}

    def uses(name: str, metric: str, duration: str) -> bool:
        rule = rules[name]
        return metric in _metric_names(rule["expr"]) and rule["for"] == duration

    assert uses("ConferenceWorkerDeadLettersGrowing", "conference_worker_dead_letters_total", "10m")
    assert uses("ConferenceWorkerDeadLetterQueueGrowing", "rabbitmq_detailed_queue_messages", "15m")
    assert (
        'queue="conference-worker.dead"' in rules["ConferenceWorkerDeadLetterQueueGrowing"]["expr"]
    )
    assert uses("ConferenceWorkerBreakerOpen", "conference_worker_breaker_state", "2m")
    assert rules["ConferenceWorkerBreakerOpen"]["expr"].endswith("== 2")
    assert uses("ConferenceWorkerNoConsumers", "rabbitmq_detailed_queue_consumers", "2m")
    no_consumers = rules["ConferenceWorkerNoConsumers"]["expr"]
    assert "min by (queue)" in no_consumers  # one partition without a consumer is enough
    assert 'queue="conference-worker.commands.intake"' in no_consumers
    assert 'queue=~"conference-worker[.]commands[.](intake|p[0-9]+)"' in no_consumers
    assert uses(
        "ConferenceWorkerCommandsTooOld", "conference_worker_command_age_seconds_bucket", "5m"
    )
    assert "histogram_quantile(0.95" in rules["ConferenceWorkerCommandsTooOld"]["expr"]
    assert uses("ConferenceWorkerNotReady", "conference_worker_ready", "5m")


def test_alerts_and_dashboard_use_only_known_metrics() -> None:
    """Every series is one the worker exports, or one of RabbitMQ's rabbitmq_* metrics."""
    queries = [rule["expr"] for rule in _alert_rules()]
    queries += [_grafana_to_promql(expr) for expr in _dashboard_queries()]
    used: set[str] = set()
    for query in queries:
        used |= _metric_names(query)
    unknown = {
        name for name in used if name not in KNOWN_METRICS and not name.startswith("rabbitmq_")
    }
    assert not unknown, f"unknown metrics: {sorted(unknown)}"
    # And the dashboard shows every worker metric.
    dashboard_metrics: set[str] = set()
    for expr in _dashboard_queries():
        dashboard_metrics |= _metric_names(_grafana_to_promql(expr))
    for metric in WORKER_METRICS:
        assert metric in dashboard_metrics, f"no panel shows {metric}"
    for histogram in WORKER_HISTOGRAMS:
        assert f"{histogram}_bucket" in dashboard_metrics, f"no panel shows {histogram}"


def test_dashboard_is_a_grafana_dashboard_with_queries() -> None:
    """Unique panel ids, on-grid positions, a datasource variable, targets that parse."""
    dashboard = _dashboard()
    assert dashboard["uid"] == "conference-worker"
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    # The command-queue panels match every command queue, partitioned (default) or not.
    commands = re.compile(variables["commands_queue"]["query"])
    topology = Settings().topology()
    for name in (topology.intake_queue, *topology.partition_queues(), topology.commands_queue):
        assert commands.fullmatch(name), name
    for name in (topology.dead_queue, topology.delay_queue(5)):
        assert not commands.fullmatch(name), name
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    titles = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets, panel["title"]
        refs = [target["refId"] for target in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            promql_parser.parse(_grafana_to_promql(target["expr"]))
    assert {
        "Commands by status",
        "Duplicates",
        "Retries",
        "Dead letters",
        "Provider latency p50 / p99",
        "In flight",
        "Breaker state",
        "Queue depth",
        "Command age",
    } <= titles


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    """The provisioned Prometheus is the compose one; the dashboards path is the mounted one."""
    provisioning = OPS / "grafana" / "provisioning"
    datasources = _load_yaml(provisioning / "datasources" / "datasources.yml")["datasources"]
    prometheus = next(ds for ds in datasources if ds["type"] == "prometheus")
    assert prometheus["url"] == "http://prometheus:9090"
    assert prometheus["isDefault"] is True
    (provider,) = _load_yaml(provisioning / "dashboards" / "dashboards.yml")["providers"]
    mounts = _volume_targets("grafana")
    assert mounts[provider["options"]["path"]] == "./ops/grafana/dashboards"
    assert mounts["/etc/grafana/provisioning"] == "./ops/grafana/provisioning"


def test_prometheus_scrapes_the_workers_and_rabbitmq_per_queue() -> None:
    """Every worker replica on CW_HTTP_PORT, and RabbitMQ's /metrics/detailed per-queue series."""
    config = _load_yaml(OPS / "prometheus" / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (worker_sd,) = jobs["conference-worker"]["dns_sd_configs"]
    assert worker_sd["names"] == ["worker"]
    assert str(worker_sd["port"]) == _services()["worker"]["environment"]["CW_HTTP_PORT"]
    detailed = jobs["rabbitmq-detailed"]
    assert detailed["metrics_path"] == "/metrics/detailed"
    assert set(detailed["params"]["family"]) == {"queue_coarse_metrics", "queue_consumer_count"}
    assert detailed["static_configs"] == [{"targets": ["rabbitmq:15692"]}]
    mounts = _volume_targets("prometheus")
    assert mounts["/etc/prometheus/alerts.yml"] == "./ops/prometheus/alerts.yml"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_config_rules_and_rule_tests() -> None:
    """promtool check config / check rules / test rules (alerts_test.yml) all pass."""
    prometheus = OPS / "prometheus"
    for command in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        result = subprocess.run(
            ["promtool", *command],
            check=False,
            cwd=prometheus,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
