"""deploy/: Dockerfile, docker-compose.yml and Kubernetes manifests, checked statically.

No Docker engine or cluster runs here, so these tests parse the files and check
that they agree with pyproject.toml (script name, Python, version) and with
consumer/settings.py (variable names, defaults, timeouts).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import tomllib
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from consumer.commands import health as health_command
from consumer.commands import publish as publish_command
from consumer.feedback import WEBHOOK_PATH
from consumer.health import HEALTHZ, READYZ
from consumer.settings import FIELDS, Settings, parse_duration

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
#: the two Deployments: the consumer (`run`) and the webhook receiver (`webhooks`)
CONSUMER = "resend-consumer"
RECEIVER = "resend-consumer-webhooks"
ENV_NAMES = {f.env for f in FIELDS}
DEFAULTS = Settings()


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def script_name() -> str:
    (name,) = pyproject()["project"]["scripts"]
    return str(name)


def python_version() -> str:
    match = re.match(r">=\s*(\d+\.\d+)", pyproject()["project"]["requires-python"])
    assert match
    return match.group(1)


# -- Dockerfile --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "dangling line continuation"
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction, args in dockerfile():
        if instruction == "FROM":
            result.append([])
        elif not result:
            assert instruction == "ARG", "only ARG may come before the first FROM"
            continue
        result[-1].append((instruction, args))
    return result


def env_pairs(args: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(args))


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list)
    assert all(isinstance(v, str) for v in value)
    return value


def test_dockerfile_is_multi_stage_on_slim_python_of_pyproject() -> None:
    """Builder and runtime stages, both python:<requires-python>-slim."""
    instructions = dockerfile()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) >= 2
    arg = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    version = arg["PYTHON_VERSION"]
    assert version == python_version() == pyproject()["tool"]["mypy"]["python_version"]
    for image in froms:
        assert image.split()[0] == "python:${PYTHON_VERSION}-slim"
    assert froms[0].split()[-2:] == ["AS", "builder"]
    assert any(ins == "COPY" and "--from=builder" in args for ins, args in stages()[-1])


def test_dockerfile_installs_from_the_lock_file_without_dev_tools() -> None:
    """The builder installs uv, then `uv sync --frozen --no-dev`; the runtime never runs pip."""
    builder, runtime = stages()[0], stages()[-1]
    runs = [args for ins, args in builder if ins == "RUN"]
    assert any(args.startswith("pip install") and "uv" in args for args in runs)
    syncs = [args for args in runs if args.startswith("uv sync")]
    assert syncs
    for args in syncs:
        assert "--frozen" in args.split()
        assert "--no-dev" in args.split()
    assert not any("pip" in args or "uv " in args for ins, args in runtime if ins == "RUN")
    copied = " ".join(args for ins, args in builder if ins == "COPY")
    assert "uv.lock" in copied
    assert "pyproject.toml" in copied


def test_dockerfile_extras_build_arg_installs_a_real_extra_from_the_lock() -> None:
    """`--build-arg EXTRAS=otel` reaches every `uv sync`, and `otel` is an extra of
    pyproject.toml that the lock file resolves (so the tracing image installs as tested)."""
    builder = stages()[0]
    assert ("ARG", 'EXTRAS=""') in builder
    syncs = [args for ins, args in builder if ins == "RUN" and args.startswith("uv sync")]
    assert syncs
    assert all('${EXTRAS:+--extra "$EXTRAS"}' in args for args in syncs)
    extras = pyproject()["project"]["optional-dependencies"]
    assert "otel" in extras
    lock = (ROOT / "uv.lock").read_text()
    for requirement in extras["otel"]:
        name = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        assert f'name = "{name}"' in lock, name


def test_dockerfile_copies_only_what_exists_and_the_dockerignore_lets_through() -> None:
    """Every COPY source exists in the repository and is not excluded from the context."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "**" in ignore
    for ins, args in dockerfile():
        if ins != "COPY" or "--from=" in args:
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, source


def test_dockerfile_runs_the_console_script_as_non_root_with_a_health_check() -> None:
    """Exec-form entrypoint of pyproject's script, `run`, non-root USER, HEALTHCHECK by `health`."""
    runtime = stages()[-1]
    users = [args for ins, args in runtime if ins == "USER"]
    assert users
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert int(user) >= 1000
    last_user = max(i for i, (ins, _) in enumerate(runtime) if ins == "USER")
    assert all(ins != "RUN" for ins, _ in runtime[last_user:]), "RUN after USER runs as non-root"

    (entrypoint,) = [exec_form(a) for ins, a in runtime if ins == "ENTRYPOINT"]
    (cmd,) = [exec_form(a) for ins, a in runtime if ins == "CMD"]
    assert entrypoint == [script_name()]
    assert pyproject()["project"]["scripts"][script_name()] == "consumer.cli:main"
    assert cmd == ["run"]

    (health,) = [a for ins, a in runtime if ins == "HEALTHCHECK"]
    options, _, command = health.partition("CMD ")
    assert "--interval=" in options
    probe = exec_form(command)
    assert probe[:2] == [script_name(), "health"]
    check = probe[probe.index("--check") + 1]
    assert check in {"live", "ready"}
    # the flags exist on the health command
    import argparse

    parser = argparse.ArgumentParser()
    health_command.add_arguments(parser)
    parser.parse_args(probe[2:])


def test_dockerfile_env_and_port_agree_with_settings() -> None:
    """ENV names are settings (or Python/uv/pip knobs), EXPOSE is HEALTH_PORT."""
    runtime = stages()[-1]
    env: dict[str, str] = {}
    for ins, args in runtime:
        if ins == "ENV":
            env.update(env_pairs(args))
    settings_env = {
        k: v for k, v in env.items() if not k.startswith(("PYTHON", "UV_", "PIP_")) and k != "PATH"
    }
    assert set(settings_env) <= ENV_NAMES
    settings = Settings.from_env(settings_env)
    (exposed,) = [a for ins, a in runtime if ins == "EXPOSE"]
    assert int(exposed) == settings.health_port == DEFAULTS.health_port == 8080
    workdir = [a for ins, a in runtime if ins == "WORKDIR"][-1]
    routes = Path(settings_env["ROUTES_FILE"])
    assert routes.is_relative_to(workdir)
    assert (ROOT / routes.relative_to(workdir)).is_file()
    assert "/app/.venv/bin" in env["PATH"]


# -- docker-compose ----------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


_INTERPOLATION = re.compile(r"\$\{([A-Z_]+):-([^}]*)\}")


def resolved_env(service: str) -> dict[str, str]:
    """The service's environment with ${VAR:-default} resolved to the default."""
    env = compose()["services"][service].get("environment", {})
    return {k: _INTERPOLATION.sub(lambda m: m.group(2), str(v)) for k, v in env.items()}


def test_compose_runs_kafka_in_kraft_mode() -> None:
    """apache/kafka, broker and controller in one process, no ZooKeeper, a health check."""
    services = compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert not any("zookeeper" in name for name in services)
    assert not any("ZOOKEEPER" in key for key in env)
    assert "test" in kafka["healthcheck"]


def test_compose_creates_the_topics_the_consumer_reads_and_dead_letters_to() -> None:
    """A one-shot service creates KAFKA_TOPICS and DLQ_TOPIC after Kafka is healthy."""
    services = compose()["services"]
    creator = services["create-topics"]
    assert creator["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert creator.get("restart", "no") == "no"
    script = " ".join(creator["command"])
    settings = Settings.from_env(resolved_env("consumer"))
    for topic in (*settings.kafka_topics, settings.dlq_topic_for(settings.kafka_topics[0])):
        assert f"--topic {topic} " in script
    feedback = Settings.from_env(resolved_env("webhooks")).feedback_topic
    assert f"--topic {feedback} " in script
    assert script.count("--if-not-exists") == script.count("--create") == 3
    partitions = int(re.search(r"--topic domain-events --partitions (\d+)", script).group(1))
    assert partitions >= 1


def test_compose_consumer_agrees_with_settings_and_the_other_services() -> None:
    """Env names exist, values parse, ports, sandbox URL, grace period and ordering agree."""
    services = compose()["services"]
    consumer = services["consumer"]
    env = resolved_env("consumer")
    assert set(env) <= ENV_NAMES
    settings = Settings.from_env(env)  # every value parses; cross-checks hold
    assert consumer["command"] == ["run"]
    assert consumer["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / consumer["build"]["context"] / consumer["build"]["dockerfile"]).is_file()
    assert f"{settings.health_port}:{settings.health_port}" in consumer["ports"]
    host, port = settings.kafka_bootstrap_servers.split(":")
    assert host == "kafka"
    assert f"PLAINTEXT://:{port}" in services["kafka"]["environment"]["KAFKA_LISTENERS"]
    grace = parse_duration(consumer["stop_grace_period"])
    assert grace > settings.shutdown_timeout
    assert grace > settings.drain_timeout
    assert consumer["depends_on"]["create-topics"]["condition"] == (
        "service_completed_successfully"
    )
    assert "sandbox" in consumer["depends_on"]

    sandbox = services["sandbox"]
    assert sandbox["command"][:3] == ["sandbox", "--host", "0.0.0.0"]
    sandbox_port = sandbox["command"][sandbox["command"].index("--port") + 1]
    assert settings.resend_base_url == f"http://sandbox:{sandbox_port}"
    assert sandbox["healthcheck"] == {"disable": True}
    assert sandbox["image"] == consumer["image"]


def test_compose_webhooks_receiver_agrees_with_settings_and_the_sandbox() -> None:
    """The receiver runs `webhooks` on WEBHOOK_PORT; the sandbox signs with its secret."""
    services = compose()["services"]
    receiver = services["webhooks"]
    env = resolved_env("webhooks")
    assert set(env) <= ENV_NAMES
    settings = Settings.from_env(env)
    assert receiver["command"] == ["webhooks"]
    assert receiver["image"] == services["consumer"]["image"]
    assert settings.webhook_host == "0.0.0.0"  # other containers post to it
    assert f"{settings.webhook_port}:{settings.webhook_port}" in receiver["ports"]
    assert settings.kafka_bootstrap_servers == resolved_env("consumer")["KAFKA_BOOTSTRAP_SERVERS"]
    assert receiver["depends_on"]["create-topics"]["condition"] == (
        "service_completed_successfully"
    )
    assert parse_duration(receiver["stop_grace_period"]) > settings.webhook_produce_timeout
    # the image's health check probes HEALTH_PORT: the receiver's own one probes WEBHOOK_PORT
    probe = receiver["healthcheck"]["test"]
    assert probe[:3] == ["CMD", script_name(), "health"]
    url = probe[probe.index("--url") + 1]
    assert url == f"http://127.0.0.1:{settings.webhook_port}{HEALTHZ}"
    parser = argparse.ArgumentParser()
    health_command.add_arguments(parser)
    parser.parse_args(probe[3:])
    # the sandbox posts to the receiver's path, signed with the secret the receiver checks
    command = [_INTERPOLATION.sub(lambda m: m.group(2), c) for c in services["sandbox"]["command"]]
    target = command[command.index("--webhook-url") + 1]
    assert target == f"http://webhooks:{settings.webhook_port}{WEBHOOK_PATH}"
    secret = command[command.index("--webhook-secret") + 1]
    assert [s.get() for s in settings.resend_webhook_secret] == [secret]
    assert "${RESEND_WEBHOOK_SECRET:-" in receiver["environment"]["RESEND_WEBHOOK_SECRET"]


def test_compose_publish_tool_uses_the_publish_command_on_shipped_examples() -> None:
    """The `publish` helper service runs `resend-consumer publish --file` on schemas/examples."""
    tool = compose()["services"]["publish"]
    script = " ".join(tool["command"])
    assert f"{script_name()} publish --file" in script
    assert "/app/schemas/examples/*.json" in script
    assert (ROOT / "schemas" / "examples").is_dir()
    assert set(resolved_env("publish")) <= ENV_NAMES
    parser = __import__("argparse").ArgumentParser()
    publish_command.add_arguments(parser)
    parser.parse_args(["--file", "x.json"])


# -- Kubernetes --------------------------------------------------------------------------


@cache
def manifests() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(K8S.glob("*.yaml"))
    }


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for docs in manifests().values()
        for doc in docs
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def container(name: str = "resend-consumer") -> dict[str, Any]:
    (c,) = only("Deployment", name)["spec"]["template"]["spec"]["containers"]
    return c


def env_settings() -> Settings:
    return Settings.from_env(only("ConfigMap", "resend-consumer-env")["data"])


def test_every_manifest_parses_and_kustomization_lists_them() -> None:
    """Each YAML has apiVersion, kind and a name; kustomization names every applied file."""
    kustomization = manifests()["kustomization.yaml"][0]
    for name, docs in manifests().items():
        assert docs, name
        for doc in docs:
            if doc["kind"] == "Kustomization":
                continue
            assert doc["apiVersion"]
            assert doc["metadata"]["name"]
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/name"] in {CONSUMER, RECEIVER}
            if labels["app.kubernetes.io/name"] == RECEIVER:
                assert labels["app.kubernetes.io/part-of"] == CONSUMER
    # the ScaledObject needs KEDA's CRDs: applied on its own once KEDA is installed
    separate = {"kustomization.yaml", "secret.example.yaml", "keda-scaledobject.yaml"}
    applied = set(manifests()) - separate
    assert set(kustomization["resources"]) == applied


def test_deployment_grace_period_exceeds_shutdown_and_drain() -> None:
    """terminationGracePeriodSeconds (40) is above SHUTDOWN_TIMEOUT and DRAIN_TIMEOUT."""
    grace = only("Deployment", CONSUMER)["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    settings = env_settings()
    assert grace == 40
    assert grace > settings.shutdown_timeout >= DEFAULTS.shutdown_timeout
    assert grace > settings.drain_timeout
    assert grace > DEFAULTS.shutdown_timeout


def test_deployment_probes_port_and_image_agree_with_the_service() -> None:
    """Readiness /readyz, liveness /healthz on HEALTH_PORT; image tag is pyproject's version."""
    c = container()
    (port,) = c["ports"]
    settings = env_settings()
    assert port["containerPort"] == settings.health_port == DEFAULTS.health_port
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port["name"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert c["args"] == ["run"]
    assert c["image"] == f"resend-consumer:{pyproject()['project']['version']}"
    annotations = only("Deployment", CONSUMER)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.health_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_deployment_env_secret_and_static_membership() -> None:
    """API key from a Secret ref, settings from the ConfigMap, instance id from the pod name."""
    c = container()
    env = {e["name"]: e for e in c["env"]}
    assert set(env) <= ENV_NAMES
    ref = env["RESEND_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["RESEND_API_KEY"]
    secret = only("Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert not re.search(r"\bre_[A-Za-z0-9_]+", (K8S / "secret.example.yaml").read_text())
    # pod names change on every rollout of a Deployment: no static membership here
    assert "KAFKA_GROUP_INSTANCE_ID" not in env
    (source,) = c["envFrom"]
    assert source["configMapRef"]["name"] == "resend-consumer-env"
    data = only("ConfigMap", "resend-consumer-env")["data"]
    assert set(data) <= ENV_NAMES
    assert "RESEND_API_KEY" not in data


def test_deployment_runs_non_root_read_only() -> None:
    """Pod and container security contexts forbid root and privilege escalation."""
    pod = only("Deployment", CONSUMER)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 1000
    sc = container()["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]


def test_replicas_do_not_exceed_partitions() -> None:
    """replicas <= the partitions compose creates for the topic (extra members would idle)."""
    script = " ".join(compose()["services"]["create-topics"]["command"])
    partitions = int(re.search(r"--topic domain-events --partitions (\d+)", script).group(1))
    deployment = only("Deployment", CONSUMER)
    assert 1 <= deployment["spec"]["replicas"] <= partitions
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    assert "replicas" in (K8S / "deployment.yaml").read_text().split("apiVersion")[0]


def test_selectors_of_pdb_and_service_match_the_pods() -> None:
    """PodDisruptionBudget and Service select exactly the Deployment's pods."""
    deployment = only("Deployment", CONSUMER)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    pdb = only("PodDisruptionBudget", CONSUMER)
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == labels
    assert pdb["spec"]["maxUnavailable"] == 1
    service = only("Service", "resend-consumer-metrics")
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"][0]["targetPort"] == container()["ports"][0]["name"]


def test_receiver_deployment_probes_and_port_are_webhook_port() -> None:
    """`webhooks` on WEBHOOK_PORT: readiness /readyz, liveness and startup /healthz, scraped."""
    c = container(RECEIVER)
    settings = env_settings()
    (port,) = c["ports"]
    assert c["args"] == ["webhooks"]
    assert c["image"] == container()["image"]
    assert port["containerPort"] == settings.webhook_port == DEFAULTS.webhook_port
    assert port["containerPort"] != settings.health_port
    assert c["readinessProbe"]["httpGet"] == {"path": READYZ, "port": port["name"]}
    assert c["livenessProbe"]["httpGet"] == {"path": HEALTHZ, "port": port["name"]}
    assert c["startupProbe"]["httpGet"] == {"path": HEALTHZ, "port": port["name"]}
    annotations = only("Deployment", RECEIVER)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.webhook_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert settings.feedback_topic == "resend-feedback"


def test_receiver_secret_comes_from_the_secret_and_kafka_from_the_shared_configmap() -> None:
    """RESEND_WEBHOOK_SECRET by secretKeyRef (never a value); Kafka settings as the consumer's."""
    c = container(RECEIVER)
    env = {e["name"]: e for e in c["env"]}
    assert set(env) <= ENV_NAMES
    assert "value" not in env["RESEND_WEBHOOK_SECRET"]
    ref = env["RESEND_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]
    secret = only("Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in secret["stringData"]
    assert not secret["stringData"][ref["key"]].startswith("whsec_"), "no real secret here"
    # it never needs the API key, and the ConfigMap holds no secret
    assert "RESEND_API_KEY" not in env
    data = only("ConfigMap", "resend-consumer-env")["data"]
    assert not {"RESEND_WEBHOOK_SECRET", "RESEND_API_KEY"} & set(data)
    assert c["envFrom"] == container()["envFrom"]


def test_receiver_runs_non_root_read_only_with_resources() -> None:
    """The receiver's pod is locked down like the consumer's and has requests and a limit."""
    consumer_pod = only("Deployment", CONSUMER)["spec"]["template"]["spec"]
    pod = only("Deployment", RECEIVER)["spec"]["template"]["spec"]
    assert pod["securityContext"] == consumer_pod["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    c = container(RECEIVER)
    assert c["securityContext"] == container()["securityContext"]
    assert c["resources"]["requests"]["cpu"]
    assert c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]


def test_receiver_grace_period_covers_the_pre_stop_pause_and_a_produce() -> None:
    """terminationGracePeriodSeconds > preStop sleep + WEBHOOK_PRODUCE_TIMEOUT; no lost capacity."""
    deployment = only("Deployment", RECEIVER)
    pod = deployment["spec"]["template"]["spec"]
    command = container(RECEIVER)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    settings = env_settings()
    assert pod["terminationGracePeriodSeconds"] > int(command[1]) + settings.webhook_produce_timeout
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_receiver_service_and_pdb_select_only_receiver_pods() -> None:
    """Its Service and PDB select the receiver's pods; no consumer selector matches them."""
    deployment = only("Deployment", RECEIVER)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = only("Service", RECEIVER)
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container(RECEIVER)["ports"][0]["name"]
    pdb = only("PodDisruptionBudget", RECEIVER)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    consumer_labels = only("Deployment", CONSUMER)["spec"]["template"]["metadata"]["labels"]
    for selector in (
        only("Deployment", CONSUMER)["spec"]["selector"]["matchLabels"],
        only("PodDisruptionBudget", CONSUMER)["spec"]["selector"]["matchLabels"],
        only("Service", "resend-consumer-metrics")["spec"]["selector"],
    ):
        assert not selector.items() <= labels.items(), selector
        assert selector.items() <= consumer_labels.items()
    assert not service["spec"]["selector"].items() <= consumer_labels.items()


@cache
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "make_routes_configmap", K8S / "make_routes_configmap.py"
    )
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_routes_configmap_is_mounted_at_routes_file() -> None:
    """The routes ConfigMap is mounted where ROUTES_FILE points, routes.yaml included."""
    routes_file = Path(only("ConfigMap", "resend-consumer-env")["data"]["ROUTES_FILE"])
    (mount,) = container()["volumeMounts"]
    assert mount["mountPath"] == str(routes_file.parent)
    assert mount["readOnly"] is True
    (volume,) = only("Deployment", CONSUMER)["spec"]["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    assert volume["configMap"]["name"] == "resend-consumer-routes"
    data = only("ConfigMap", "resend-consumer-routes")["data"]
    paths = {item["path"]: item["key"] for item in volume["configMap"]["items"]}
    assert paths[routes_file.name] == routes_file.name
    assert set(paths.values()) == set(data)
    assert any(p.startswith("templates/") for p in paths)


@pytest.mark.parametrize("name", ["routes-configmap.yaml", "deployment.yaml"])
def test_routes_configmap_matches_schemas(name: str) -> None:
    """Generated files are up to date with schemas/ (else run make_routes_configmap.py)."""
    gen = generator()
    path = K8S / name
    expected = (
        gen.configmap_text()
        if name == "routes-configmap.yaml"
        else gen.deployment_text(path.read_text())
    )
    assert path.read_text() == expected, (
        f"{name} is stale: run .venv/bin/python deploy/k8s/make_routes_configmap.py"
    )
    data = only("ConfigMap", "resend-consumer-routes")["data"]
    for key, rel in gen.schema_files().items():
        assert data[key] == (ROOT / "schemas" / rel).read_text()


def test_image_installs_the_uv_that_deploy_dev_pins() -> None:
    """The Dockerfile's uv is the one the developer loop (and so CI) uses."""
    dev = (ROOT / "deploy" / "dev").read_text()
    pinned = re.search(r'^UV_VERSION="([0-9.]+)"', dev, re.M)
    assert pinned is not None
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG UV_VERSION={pinned.group(1)}" in dockerfile
    assert 'pip install "uv==${UV_VERSION}"' in dockerfile


def test_keda_scaled_object_scales_the_consumer_on_its_group_lag() -> None:
    """The ScaledObject targets the consumer Deployment, reads the group and topic the
    ConfigMap configures, and never scales past the source topic's partition count."""
    scaled = yaml.safe_load((DEPLOY / "k8s" / "keda-scaledobject.yaml").read_text())
    assert scaled["kind"] == "ScaledObject"
    deployments = [
        doc
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / "deployment.yaml").read_text())
        if doc and doc.get("kind") == "Deployment"
    ]
    assert scaled["spec"]["scaleTargetRef"]["name"] in {d["metadata"]["name"] for d in deployments}
    config = yaml.safe_load((DEPLOY / "k8s" / "configmap.yaml").read_text())["data"]
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["consumerGroup"] == config["KAFKA_GROUP_ID"]
    assert meta["topic"] == config["KAFKA_TOPICS"]
    assert meta["bootstrapServers"] == config["KAFKA_BOOTSTRAP_SERVERS"]
    assert int(meta["activationLagThreshold"]) < int(meta["lagThreshold"])
    create = " ".join(compose()["services"]["create-topics"]["command"])
    partitions = int(create.split(f"--topic {config['KAFKA_TOPICS']} --partitions ")[1].split()[0])
    spec = scaled["spec"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
