"""The deployment files agree with the code: commands, settings, ports, images, paths.

deploy/docker-compose.yml, deploy/k8s/*.yaml and deploy/Dockerfile are parsed (nothing is
built or run): every command they run must be a ``routeloop`` command that click accepts,
every ROUTELOOP_* variable a field of Settings (and all of them together valid settings), the
ports those the workers listen on, and every image either the one deploy/Dockerfile builds or
a pinned public one.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import yaml

from deploy.cli import main
from deploy.kafka import client_kwargs
from router.metrics import metrics_port
from schemas.settings import ENV_PREFIX, Settings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"routeloop:{VERSION}"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in (raw.strip() for raw in text.splitlines()) if line and not line.startswith("#")]


def entrypoint(dockerfile: Path) -> list[str]:
    [args] = [json.loads(a) for i, a in dockerfile_instructions(dockerfile) if i == "ENTRYPOINT"]
    return args


def k8s_documents() -> Iterator[tuple[str, dict]]:
    """(file name, object) of every Kubernetes object (kustomization.yaml is not one)."""
    for path in sorted(set(K8S.glob("*.yaml")) - {K8S / "kustomization.yaml"}):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path.name, document


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_workers() -> dict[str, dict]:
    return {name: service for name, service in compose()["services"].items() if "build" in service}


def pod_specs() -> Iterator[tuple[str, dict]]:
    for name, document in k8s_documents():
        if document["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{name}:{document['metadata']['name']}", document["spec"]["template"]["spec"]


def k8s_containers() -> Iterator[tuple[str, dict]]:
    for where, spec in pod_specs():
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield f"{where}/{container['name']}", container


def resolve(argv: list[str]) -> click.Command:
    """The click command ``argv`` runs, its arguments parsed and checked, as click would."""
    assert argv[0] == "routeloop", argv
    command: click.Command = main
    args = list(argv[1:])
    while isinstance(command, click.Group):
        assert args, f"{argv}: a group needs a subcommand"
        name, *args = args
        sub = command.get_command(click.Context(command), name)
        assert sub is not None, f"{argv}: no command {name!r} in {sorted(command.commands)}"
        command = sub
    command.make_context(command.name, args)  # raises click.UsageError / BadParameter
    return command


def test_the_routeloop_console_script_is_the_cli():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["routeloop"] == "deploy.cli:main"
    assert entrypoint(DEPLOY / "Dockerfile") == ["routeloop"]


def test_resolve_refuses_what_click_refuses():
    assert resolve(["routeloop", "worker", "router"]).name == "worker"
    with pytest.raises(click.BadParameter):
        resolve(["routeloop", "worker", "scheduler"])
    with pytest.raises(AssertionError, match="no command"):
        resolve(["routeloop", "serve"])


def test_compose_runs_cli_commands_and_every_worker():
    ran = set()
    for service in compose_workers().values():
        build = service["build"]
        resolve(entrypoint(COMPOSE.parent / build["context"] / build["dockerfile"]) + service["command"])
        ran.add(tuple(service["command"]))
    assert {("worker", "router"), ("worker", "feedback"), ("worker", "learner"), ("topics",)} <= ran


def test_k8s_runs_cli_commands_and_every_worker():
    ran = set()
    for where, container in k8s_containers():
        argv = container.get("command", entrypoint(DEPLOY / "Dockerfile")) + container.get("args", [])
        resolve(argv)
        ran.add(tuple(argv[1:]))
    assert {("worker", "router"), ("worker", "feedback"), ("worker", "learner"), ("topics",)} <= ran


def routeloop_variables() -> Iterator[tuple[str, str, str]]:
    """(where, name, value) of every ROUTELOOP_* variable the files set."""
    for name, service in compose()["services"].items():
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        for key, value in environment.items():
            yield f"compose:{name}", key, str(value)
    for where, document in k8s_documents():
        if document["kind"] == "ConfigMap":
            yield from ((where, k, str(v)) for k, v in document.get("data", {}).items())
        if document["kind"] == "Secret":
            yield from ((where, k, str(v)) for k, v in document.get("stringData", {}).items())
    for where, container in k8s_containers():
        for variable in container.get("env", []):
            yield where, variable["name"], str(variable.get("value", ""))
    for instruction, args in dockerfile_instructions(DEPLOY / "Dockerfile"):
        if instruction == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                yield "Dockerfile", key, value


def test_every_routeloop_variable_is_a_setting():
    seen = set()
    for where, name, _ in routeloop_variables():
        if name.startswith(ENV_PREFIX):
            field = name.removeprefix(ENV_PREFIX).lower()
            assert field in Settings.model_fields, f"{where}: {name} is not a field of schemas.settings.Settings"
            seen.add(name)
    assert {"ROUTELOOP_BOOTSTRAP_SERVERS", "ROUTELOOP_MODELS", "ROUTELOOP_HTTP_PORT",
            "ROUTELOOP_SASL_PASSWORD", "ROUTELOOP_SNAPSHOT_KEY"} <= seen


@pytest.mark.parametrize("sources", [("compose:router", "Dockerfile"), ("configmap.yaml", "secret.yaml", "Dockerfile")])
def test_the_variables_make_valid_settings(sources):
    env = {name: value for where, name, value in routeloop_variables()
           if where in sources and name.startswith(ENV_PREFIX)}
    settings = Settings.load(env=env)
    client_kwargs(settings)  # the security settings are consistent (e.g. SASL has a password)


def test_ports_are_the_ones_the_workers_listen_on():
    k8s = Settings.load(env={k: v for w, k, v in routeloop_variables() if w == "configmap.yaml"})
    for where, container in k8s_containers():
        args = container.get("args", [])
        if args[:1] != ["worker"]:
            continue  # the topics init containers listen on nothing
        kind = args[1]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert list(ports.values()) == [metrics_port(k8s, kind)], where
        for probe in ("readinessProbe", "livenessProbe"):
            if probe in container:
                target = container[probe].get("httpGet") or container[probe]["tcpSocket"]
                assert target["port"] in ports, (where, probe)
                if "httpGet" in container[probe]:
                    assert target["path"] == "/healthz" and kind == "router", (where, probe)
    for where, document in k8s_documents():
        annotations = document.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations", {})
        if "prometheus.io/port" in annotations:
            kind = document["metadata"]["name"].removeprefix("routeloop-")
            assert int(annotations["prometheus.io/port"]) == metrics_port(k8s, kind), where

    local = Settings.load(env={k: v for w, k, v in routeloop_variables() if w == "compose:router"})
    for name, service in compose_workers().items():
        if service["command"][0] == "worker":
            port = metrics_port(local, service["command"][1])
            assert service["ports"] == [f"{port}:{port}"], name


def test_the_learner_is_one_replica_replaced_not_rolled():
    [learner] = [d for _, d in k8s_documents() if d["metadata"]["name"] == "routeloop-learner"]
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"] == {"type": "Recreate"}


def test_images_are_built_here_or_pinned():
    for name, service in compose()["services"].items():
        if "build" in service:
            assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
            assert service["image"] == IMAGE, name
        else:
            repository, _, tag = service["image"].partition(":")
            assert tag and tag != "latest", f"compose:{name}: pin {repository} to a version"
    for where, container in k8s_containers():
        assert container["image"] == IMAGE, where
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {
        "kustomization.yaml", "secret.yaml"}  # the Secret is created by hand, never from the repository
    assert kustomization["images"] == [{"name": "routeloop", "newTag": VERSION}]


def test_the_dockerfile_copies_paths_that_exist():
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    [base] = [args for i, args in instructions if i == "FROM"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base)
    copied = [args.split()[:-1] for i, args in instructions if i == "COPY"]
    assert copied
    for sources in copied:
        for source in sources:
            assert (REPO / source).exists(), source
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for sources in copied:
        for source in sources:
            assert f"!{source}" in ignored, f"{source} is copied but not let through the .dockerignore"
