"""The deployment files refer only to what exists: images, ports, variables, routes.

No Docker engine or cluster runs in CI, so these checks read the files: the compose
file and the Kubernetes manifests parse, every ``GATEWAY_`` variable they set is one
the command of that container reads, every port and service name agrees with the
Dockerfile, HAProxy's configuration and the gateway's defaults, and the grace
period covers the gateway's shutdown.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from gateway.cli import main
from gateway.config import ENV_PREFIX, Settings
from gateway.ingress.http import routes

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
IMAGE = "notification-gateway:latest"
SETTINGS_VARIABLES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


def _variables_read_by(args: list[str]) -> set[str]:
    """The GATEWAY_ variables that ``gateway <args>`` reads.

    The commands built on the settings read every settings variable; the
    producers read the variables of their own options.
    """
    command: click.Command = main
    for word in args:
        if not isinstance(command, click.Group) or word not in command.commands:
            break
        command = command.commands[word]
    assert command is not main, f"no gateway command {args}"
    if args[0] != "produce":
        return SETTINGS_VARIABLES
    envvars: set[str] = set()
    for param in command.params:
        if isinstance(param.envvar, str):
            envvars.add(param.envvar)
        elif param.envvar:
            envvars.update(str(name) for name in param.envvar)
    return envvars


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return compose


def _manifests() -> list[dict[str, Any]]:
    documents = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        if path.name != "kustomization.yaml":
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def _haproxy() -> str:
    return (DEPLOY / "haproxy.cfg").read_text()


# The Dockerfile


def test_dockerfile_is_multi_stage_non_root_with_health_check_and_serve() -> None:
    """Two stages, a numeric non-root user, a health check, gateway serve."""
    text = _dockerfile()
    stages = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    assert len(stages) >= 2, stages
    assert re.search(r"^COPY --from=build /opt/gateway ", text, re.MULTILINE)
    (user,) = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.MULTILINE)
    assert re.search(r'^ENTRYPOINT \["gateway"\]$', text, re.MULTILINE)
    assert re.search(r'^CMD \["serve"\]$', text, re.MULTILINE)


def test_dockerfile_variables_are_settings_and_ports_their_defaults() -> None:
    """Its GATEWAY_ variables exist; it listens on all addresses; EXPOSE gives
    the HTTP port and the embedded broker's two ports."""
    text = _dockerfile()
    blocks = re.findall(r"^ENV (.*?)(?=^\S)", text, re.MULTILINE | re.DOTALL)
    values = dict(re.findall(r"(GATEWAY_\w+)=(\S+)", "".join(blocks)))
    assert set(values) <= SETTINGS_VARIABLES, set(values) - SETTINGS_VARIABLES
    assert values["GATEWAY_HOST"] == "0.0.0.0"
    assert int(values["GATEWAY_PORT"]) == _default("port")
    (exposed,) = re.findall(r"^EXPOSE (.+)$", text, re.MULTILINE)
    ports = {int(port) for port in exposed.split()}
    assert ports == {_default("port"), _default("mqtt_port"), _default("mqtt_ws_port")}


def test_dockerignore_keeps_what_the_build_copies() -> None:
    """Every path the Dockerfile copies from the context is let in."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", _dockerfile(), re.MULTILINE):
        copied.update(shlex.split(line)[:-1])
    for path in copied:
        assert path.split("/")[0] in kept, path
        assert (ROOT / path).exists(), path


# The compose file


def test_compose_has_every_part_and_builds_the_one_image() -> None:
    """Two replicas, HAProxy, Redis, Mosquitto, the worker and both producers;
    every gateway container runs the image built from the Dockerfile."""
    services = _compose()["services"]
    assert set(services) == {
        "redis",
        "mosquitto",
        "gateway-1",
        "gateway-2",
        "haproxy",
        "worker",
        "producer-stocks",
        "producer-fixtures",
    }
    for name, service in services.items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]) == ROOT / "Dockerfile"
            assert service["image"] == IMAGE, name
    commands = {name: service.get("command") for name, service in services.items()}
    assert commands["gateway-1"] == commands["gateway-2"] == ["serve"]
    assert commands["worker"] == ["worker"]
    assert commands["producer-stocks"][:2] == ["produce", "stocks"]
    assert commands["producer-fixtures"][:2] == ["produce", "fixtures"]
    assert "GATEWAY_REDIS_URL" in services["worker"]["environment"]


def test_compose_variables_are_read_by_each_container_command() -> None:
    """Every GATEWAY_ variable a container gets is read by its command."""
    for name, service in _compose()["services"].items():
        environment = service.get("environment", {})
        names = {key for key in environment if key.startswith(ENV_PREFIX)}
        if service.get("image") != IMAGE:
            assert not names, name
            continue
        unknown = names - _variables_read_by(service["command"])
        assert not unknown, f"{name}: {unknown}"


def test_compose_ports_names_and_mounts_agree() -> None:
    """HAProxy's port and servers, the URLs of Redis and Mosquitto, and the
    mounted files all match what the services and the files say."""
    compose = _compose()
    services = compose["services"]
    haproxy = _haproxy()
    (bind,) = re.findall(r"^\s+bind :(\d+)$", haproxy, re.MULTILINE)
    assert services["haproxy"]["ports"] == [f"{bind}:{bind}"]
    servers = re.findall(r"^\s+server \S+ ([\w-]+):(\d+) ", haproxy, re.MULTILINE)
    assert servers == [("gateway-1", "8000"), ("gateway-2", "8000")]
    assert _default("port") == 8000
    for name in ("gateway-1", "gateway-2"):
        assert services[name]["expose"] == ["8000"]
        environment = services[name]["environment"]
        assert environment["GATEWAY_REPLICA"] == name
        assert environment["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
        assert re.fullmatch(
            r"mqtt://gateway:.+@mosquitto:1883", environment["GATEWAY_MQTT_URL"]
        )
    for producer in ("producer-stocks", "producer-fixtures"):
        url = services[producer]["environment"]["GATEWAY_URL"]
        assert url == f"http://haproxy:{bind}"
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    listeners = re.findall(r"^listener (\d+)$", conf, re.MULTILINE)
    assert services["mosquitto"]["ports"] == [f"{p}:{p}" for p in listeners]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
            else:
                assert source in compose["volumes"], source
    grace = float(services["gateway-1"]["stop_grace_period"].rstrip("s"))
    assert grace >= _default("drain_delay") + _default("shutdown_timeout") + 2


# The Kubernetes manifests


def _containers(documents: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for document in documents:
        if document["kind"] == "Deployment":
            spec = document["spec"]["template"]["spec"]
            found += [(document["metadata"]["name"], c) for c in spec["containers"]]
    return found


def _by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def test_kustomization_lists_every_manifest() -> None:
    """kubectl apply -k applies every file of deploy/k8s."""
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_manifests_set_only_variables_their_command_reads() -> None:
    """Every container runs the image; every GATEWAY_ variable it gets, directly
    or from the ConfigMap and Secret, is read by its command; every reference
    names a key that exists."""
    documents = _manifests()
    config_maps = {n: d["data"] for n, d in _by_kind(documents, "ConfigMap").items()}
    secrets = {n: d["stringData"] for n, d in _by_kind(documents, "Secret").items()}
    containers = _containers(documents)
    assert {name for name, _ in containers} == {
        "gateway",
        "gateway-worker",
        "producer-stocks",
        "producer-fixtures",
    }
    for name, container in containers:
        assert container["image"] == IMAGE, name
        names = set()
        for item in container.get("env", []):
            names.add(item["name"])
            source = item.get("valueFrom", {})
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["key"] in config_maps[ref["name"]], ref
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                assert ref["key"] in secrets[ref["name"]], ref
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                names.update(config_maps[source["configMapRef"]["name"]])
            if "secretRef" in source:
                names.update(secrets[source["secretRef"]["name"]])
        unknown = names - _variables_read_by(container["args"])
        assert not unknown, f"{name}: {unknown}"


def test_gateway_deployment_probes_ports_and_grace_period() -> None:
    """Probes on /readyz and /healthz, the settings' port, and a grace period
    that covers preStop, drain delay, shutdown timeout and close timeout."""
    documents = _manifests()
    deployment = _by_kind(documents, "Deployment")["gateway"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["serve"]
    paths = {route.path for route in routes}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in paths
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": _default("port")}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "http"
    config = _by_kind(documents, "ConfigMap")["gateway-config"]["data"]

    def setting(name: str) -> float:
        return float(config.get(f"GATEWAY_{name.upper()}", _default(name)))

    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    needed = (
        float(pause[1])
        + setting("drain_delay")
        + setting("shutdown_timeout")
        + setting("close_timeout")
    )
    assert pod["terminationGracePeriodSeconds"] >= needed + 2, needed
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_service_budget_and_autoscaler_point_at_the_gateway() -> None:
    """Service, PodDisruptionBudget and autoscaler select the gateway's pods."""
    documents = _manifests()
    deployment = _by_kind(documents, "Deployment")["gateway"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    service = _by_kind(documents, "Service")["gateway"]
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    budget = _by_kind(documents, "PodDisruptionBudget")["gateway"]
    assert budget["spec"]["selector"]["matchLabels"] == labels
    autoscaler = _by_kind(documents, "HorizontalPodAutoscaler")["gateway"]
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gateway")
    assert autoscaler["spec"]["minReplicas"] >= 2
    producers = [c for n, c in _containers(documents) if n.startswith("producer")]
    for container in producers:
        urls = [e["value"] for e in container["env"] if e["name"] == "GATEWAY_URL"]
        assert urls == [f"http://gateway:{service['spec']['ports'][0]['port']}"]


def test_outside_services_are_named_by_configuration() -> None:
    """Redis and the broker are ExternalName services the URLs refer to."""
    documents = _manifests()
    services = _by_kind(documents, "Service")
    config = _by_kind(documents, "ConfigMap")["gateway-config"]["data"]
    secret = _by_kind(documents, "Secret")["gateway-secrets"]["stringData"]
    assert services["redis"]["spec"]["type"] == "ExternalName"
    assert services["mqtt-broker"]["spec"]["type"] == "ExternalName"
    assert config["GATEWAY_REDIS_URL"].startswith("redis://redis:")
    assert re.fullmatch(
        r"mqtt://gateway:.+@mqtt-broker:1883", secret["GATEWAY_MQTT_URL"]
    )
    Settings(
        redis_url=config["GATEWAY_REDIS_URL"],
        mqtt_url=secret["GATEWAY_MQTT_URL"],
        api_key=secret["GATEWAY_API_KEY"],
    )


# The local topology script


@pytest.mark.parametrize(
    ("path", "lines"),
    [
        ("haproxy.cfg", ["    bind :8080", "gateway-1:8000", "gateway-2:8000"]),
        (
            "mosquitto/mosquitto.conf",
            [
                "listener 1883",
                "listener 9001",
                "password_file ",
                "acl_file ",
                "persistence_location ",
                "log_dest ",
            ],
        ),
    ],
)
def test_topology_script_finds_what_it_rewrites(path: str, lines: list[str]) -> None:
    """The lines topology.sh moves to loopback ports and its run directory exist."""
    text = (DEPLOY / path).read_text()
    for line in lines:
        assert line in text, line
    script = (DEPLOY / "local" / "topology.sh").read_text()
    assert f"$root/deploy/{path}" in script
    subprocess.run(["bash", "-n", str(DEPLOY / "local" / "topology.sh")], check=True)
