"""The deployment files: docker-compose.yml (every profile) and the Kubernetes manifests in
deploy/k8s run real ``conveyor`` commands with real settings, and the manifests pass the
Kubernetes schemas (kubernetes-validate, strict: no unknown field). KEDA's ScaledObject is a
CRD outside those schemas: its shape is checked here instead. The Dockerfile's image installs
the ``otel`` extra."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.cli.main import build_parser
from app.observe.exposition import render
from app.observe.snapshot import Snapshot
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
CONVEYOR_COMMANDS = {"api", "worker", "migrate"}
# Names the manifests use that are not settings: the migration Job's own database URL.
NOT_SETTINGS = {"CONVEYOR_MIGRATE_DATABASE_URL"}


def _conveyor_argv(argv: list[str]) -> None:
    """``argv`` is a ``conveyor`` command line the CLI accepts, of a long-running kind."""
    assert argv[0] == "conveyor", argv
    assert argv[1] in CONVEYOR_COMMANDS, argv
    try:
        build_parser().parse_args([str(a) for a in argv[1:]])
    except SystemExit as exc:
        raise AssertionError(f"conveyor refuses {argv}") from exc


def _setting_names(names: list[str]) -> None:
    known = {f"CONVEYOR_{name.upper()}" for name in Settings.model_fields}
    unknown = {n for n in names if n.startswith("CONVEYOR_")} - known - NOT_SETTINGS
    assert not unknown, f"not Conveyor settings: {sorted(unknown)}"


# --- Dockerfile ------------------------------------------------------------------------------


def test_image_installs_the_otel_extra() -> None:
    """The image can trace: the ``OTEL_*`` variables alone turn it on (README, Tracing)."""
    installs = re.findall(r"^RUN pip install (.+?) &&", (ROOT / "Dockerfile").read_text(), re.M)
    assert installs == ['".[otel]"'], installs


# --- docker-compose.yml ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def _profile(compose: dict[str, Any], profile: str | None) -> dict[str, dict[str, Any]]:
    """The services ``docker compose [--profile P] up`` starts."""
    services: dict[str, dict[str, Any]] = compose["services"]
    return {
        name: s
        for name, s in services.items()
        if not s.get("profiles") or (profile is not None and profile in s["profiles"])
    }


@pytest.mark.parametrize("profile", [None, "cluster"])
def test_compose_services_run_real_commands(compose: dict[str, Any], profile: str | None) -> None:
    services = _profile(compose, profile)
    kinds: dict[str, list[str]] = {}
    for name, service in services.items():
        _setting_names(list(service.get("environment", {})))
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} waits for {dependency}, not started"
        if service.get("image") != "conveyor:latest":
            continue
        assert service.get("build") == ".", name
        _conveyor_argv(service["command"])
        kinds.setdefault(service["command"][1], []).append(name)
    assert set(kinds) == CONVEYOR_COMMANDS, kinds
    if profile == "cluster":
        [api] = [s for s in kinds["api"] if "profiles" in services[s]]
        [worker] = [s for s in kinds["worker"] if "profiles" in services[s]]
        for name in (api, worker, *kinds["migrate"]):
            env = services[name]["environment"]
            if "profiles" in services[name]:
                assert env["CONVEYOR_REDIS_CLUSTER"] == "true", name
                assert int(env["CONVEYOR_PARTITIONS"]) > 1, name
        assert services[worker]["deploy"]["replicas"] >= 2


def test_compose_cluster_profile_builds_a_redis_cluster(compose: dict[str, Any]) -> None:
    services = _profile(compose, "cluster")
    nodes = sorted(
        name
        for name, s in services.items()
        if s.get("image", "").startswith("redis") and "--cluster-enabled" in s.get("command", [])
    )
    assert len(nodes) >= 6, nodes  # three masters with a replica each
    for name in nodes:
        command = services[name]["command"]
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    creators = [n for n, s in services.items() if "--cluster create" in str(s.get("command"))]
    assert len(creators) == 1, creators
    script = " ".join(services[creators[0]]["command"]).replace("$$", "$")  # compose's escape
    subprocess.run(["sh", "-n", "-c", script], check=True)  # a valid shell script
    loop = re.search(r"for n in ([\d ]+); do\s+nodes=.*redis-node-\$n ", script)
    assert loop, script
    assert {f"redis-node-{n}" for n in loop.group(1).split()} == set(nodes)
    assert "--cluster-replicas 1" in script
    assert set(services[creators[0]]["depends_on"]) == set(nodes)
    url = compose["x-conveyor-cluster"]["environment"]["CONVEYOR_REDIS_URL"]
    assert url.split("//")[1].split(":")[0] in nodes


# --- deploy/k8s ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def test_manifests_pass_the_kubernetes_schemas(manifests: list[dict[str, Any]]) -> None:
    version = kubernetes_validate.latest_version()
    core = [m for m in manifests if not m["apiVersion"].startswith("keda.sh/")]
    assert {m["kind"] for m in core} >= {"Deployment", "Service", "Job", "ConfigMap", "Secret"}
    for manifest in core:
        kubernetes_validate.validate(manifest, version, strict=True)
    # The validator does refuse a wrong manifest (so the loop above proves something).
    broken = copy.deepcopy(_find(manifests, "Deployment", "conveyor-worker"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_manifests_fit_together(manifests: list[dict[str, Any]]) -> None:
    """Real commands and settings, references that resolve, a Service that selects the API,
    the migration as a one-shot Job."""
    config = _find(manifests, "ConfigMap", "conveyor")
    secret = _find(manifests, "Secret", "conveyor")
    _setting_names([*config["data"], *secret["stringData"]])
    commands: dict[str, str] = {}
    for m in manifests:
        if m["kind"] not in {"Deployment", "Job"}:
            continue
        pod = m["spec"]["template"]["spec"]
        for container in pod["containers"]:
            _conveyor_argv(container["command"])
            commands[m["metadata"]["name"]] = container["command"][1]
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source["secretRef"]
                assert ref["name"] == "conveyor"
            for var in container.get("env", []):
                if "valueFrom" in var and "secretKeyRef" in var["valueFrom"]:
                    assert var["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
        if m["kind"] == "Job":
            assert pod["restartPolicy"] == "Never"
        else:
            labels = m["spec"]["template"]["metadata"]["labels"]
            assert m["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert sorted(commands.values()) == ["api", "migrate", "worker"], commands
    api = _find(manifests, "Deployment", "conveyor-api")
    service = _find(manifests, "Service", "conveyor-api")
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )
    hosts = config["data"]["CONVEYOR_ALLOWED_HOSTS"].split(",")
    assert "conveyor-api.conveyor.svc" in hosts  # Prometheus scrapes /metrics through it
    worker = _find(manifests, "Deployment", "conveyor-worker")
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > Settings().shutdown_grace_seconds + 15  # the worker's shutdown bound


def test_keda_scaled_object_scales_the_workers_on_a_served_metric(
    manifests: list[dict[str, Any]],
) -> None:
    [scaled] = [m for m in manifests if m["kind"] == "ScaledObject"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    }
    target = _find(manifests, "Deployment", spec["scaleTargetRef"]["name"])
    assert target["spec"]["template"]["spec"]["containers"][0]["command"][1] == "worker"
    assert 0 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    meta = trigger["metadata"]
    assert {"serverAddress", "query", "threshold"} <= set(meta)
    assert all(isinstance(v, str) for v in meta.values())  # KEDA's metadata is strings only
    float(meta["threshold"])
    served, _ = render({}, Snapshot(counts={"default": {"queued": 7}}), 0.0)
    metric = meta["query"].split("(", 1)[1].split("{", 1)[0]
    assert f'{metric}{{queue="default",status="queued"}} 7.0' in served.decode()
