"""Deployment files, checked offline: the Kubernetes manifests against the API's own JSON schemas
(kubernetes-validate ships them), then against what the schemas cannot know (the settings, the app's
routes, the image); the compose file against the settings; the Dockerfile against .dockerignore."""

from __future__ import annotations

import copy
import fnmatch
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.config import Settings, load_settings
from app.main import create_app
from tests.support import ROOT

MANIFESTS = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes these manifests are for (every API they use is GA there), and the newest the
# package knows: an API removed since would fail there.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# After the drain timeout, what is cut gets this long to send its final events (app/drain.py).
FINAL_EVENTS_S = 5.0
DEFAULT_DRAIN_GRACE_S, DEFAULT_DRAIN_TIMEOUT_S = 5.0, 30.0
# Where tempfile puts each sandbox run's scratch directory in the image (no TMPDIR is set there).
CONTAINER_TMP = "/tmp"  # noqa: S108 (a path in the container, never opened here)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        documents += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def _by_kind() -> dict[str, dict[str, Any]]:
    kinds: dict[str, dict[str, Any]] = {}
    for _name, doc in _documents():
        assert doc["kind"] not in kinds, f"two {doc['kind']}s: the checks below expect one of each"
        kinds[doc["kind"]] = doc
    return kinds


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_the_kubernetes_api(version: str) -> None:
    documents = _documents()
    assert {doc["kind"] for _, doc in documents} == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Job",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    }
    for name, doc in documents:
        # strict: a field the API does not have (a misspelt one) is an error, not ignored.
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {'.'.join(map(str, exc.path))}: {exc.message}")


def test_the_validation_rejects_what_the_api_would() -> None:
    deployment = _by_kind()["Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    misspelt, wrong_type = copy.deepcopy(deployment), copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = container["livenessProbe"]
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "sixty"
    for broken in (misspelt, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def _settings(
    config_yaml: str, environment: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The Settings a container would build from this YAML file and these variables (refusing any
    misspelt setting or unknown PACEMAKER_* variable, as the server does at start)."""
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml)
    for variable in [name for name in os.environ if name.startswith("PACEMAKER_")]:
        monkeypatch.delenv(variable)
    monkeypatch.setenv("PACEMAKER_CONFIG", str(config))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return load_settings()


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _image_uid() -> int:
    match = re.search(r"^USER (\d+)(?::\d+)?$", _dockerfile(), re.MULTILINE)
    assert match, "the Dockerfile names its user by number"
    return int(match.group(1))


def _image_workdir() -> PurePosixPath:
    runtime = _dockerfile().split("AS runtime", 1)[1]
    match = re.search(r"^WORKDIR (\S+)$", runtime, re.MULTILINE)
    assert match
    return PurePosixPath(match.group(1))


def test_the_deployment_fits_the_settings_the_app_and_the_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kinds = _by_kind()
    deployment, service, config_map, secret = (
        kinds["Deployment"],
        kinds["Service"],
        kinds["ConfigMap"],
        kinds["Secret"],
    )
    pod = _pod(deployment)
    (server,) = pod["containers"]
    env = {item["name"]: item["value"] for item in server["env"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in server["volumeMounts"]}

    # The settings a pod builds from the ConfigMap and the Secret are valid, and name a real file.
    config_volume = next(volume for volume in pod["volumes"] if volume.get("configMap"))
    (config_key,) = config_map["data"]
    assert env["PACEMAKER_CONFIG"] == f"{mounts[config_volume['name']]}/{config_key}"
    assert [source["secretRef"]["name"] for source in server["envFrom"]] == [secret["metadata"]["name"]]
    settings = _settings(config_map["data"][config_key], secret["stringData"], tmp_path, monkeypatch)
    assert settings.database.url.startswith("postgresql+asyncpg://")
    assert settings.limits.redis_url, "several replicas need shared limits (limits.redis_url)"
    assert settings.providers["openai"].api_key is not None

    # One port, by name, from the settings to the probes and the Service.
    assert server["ports"] == [{"name": "http", "containerPort": settings.server.port, "protocol": "TCP"}]
    assert settings.server.host == "0.0.0.0"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    routes = create_app(settings).openapi()["paths"]
    probes = {kind: server[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/health/live",
        "livenessProbe": "/health/live",
        "readinessProbe": "/health/ready",
    }
    assert all(probe["path"] in routes and probe["port"] == "http" for probe in probes.values())
    # Readiness checks the database then Redis, each for up to 2 s: the probe must wait for both.
    assert server["readinessProbe"]["timeoutSeconds"] > 4

    # Serving, not migrating (the Job does); the same image everywhere.
    assert server["args"] == ["serve"]
    (wait,) = pod["initContainers"]
    assert "pacemaker migrate --check" in " ".join(wait["command"])
    job = kinds["Job"]
    assert _pod(job)["containers"][0]["args"] == ["migrate"]
    containers = [c for doc in (deployment, job) for c in _pod(doc)["containers"] + _pod(doc).get("initContainers", [])]
    images = {container["image"] for container in containers}
    assert len(images) == 1, images

    # Long enough for the whole drain: grace, in-flight work, final events, the writers' last write.
    grace = getattr(settings.server, "drain_grace_s", DEFAULT_DRAIN_GRACE_S)
    drain = getattr(settings.server, "drain_timeout_s", DEFAULT_DRAIN_TIMEOUT_S)
    writers = max(settings.audit.shutdown_timeout_s, settings.tasks.shutdown_timeout_s)
    assert pod["terminationGracePeriodSeconds"] > grace + drain + FINAL_EVENTS_S + writers

    # Read-only root: everything the settings write is under a writable volume, and /tmp (sandbox runs).
    writable = [PurePosixPath(path) for name, path in mounts.items() if name != config_volume["name"]]
    workdir = _image_workdir()
    written = [
        settings.audit.spool_dir,
        settings.tasks.spool_dir,
        settings.audit.dead_letter_dir or Path(f"{settings.audit.spool_dir}-dead-letter"),
        settings.tasks.dead_letter_dir or Path(f"{settings.tasks.spool_dir}-dead-letter"),
        settings.sandbox.cache_dir,
        settings.sandbox.sessions_dir,
        settings.auth.dev_key_file.parent,
    ]
    for path in [workdir / PurePosixPath(p.as_posix()) for p in written] + [PurePosixPath(CONTAINER_TMP, "run")]:
        assert any(root == path or root in path.parents for root in writable), f"{path} is on the read-only root"

    # Selectors: the Deployment's own, the Service's, the PDB's and the HPA's target all reach these pods.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pacemaker"}
    assert "replicas" not in deployment["spec"], "kubectl apply would reset the autoscaler's count"
    assert hpa["minReplicas"] == settings.limits.expected_instances
    assert kinds["PodDisruptionBudget"]["spec"]["maxUnavailable"] < hpa["minReplicas"]


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_pods_run_as_the_image_user_read_only_and_bounded(kind: str) -> None:
    pod = _pod(_by_kind()[kind])
    context = pod["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == _image_uid()
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
        assert "memory" in container["resources"]["limits"]


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose


def test_compose_runs_two_replicas_on_one_database_and_one_redis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = _compose()["services"]
    assert set(services) == {"migrate", "pacemaker-a", "pacemaker-b", "postgres", "redis"}
    replicas = [services["pacemaker-a"], services["pacemaker-b"]]
    urls = set()
    for service in [*replicas, services["migrate"]]:
        # Every variable is one the settings take (PACEMAKER_REDIS_URL, say, stops the server at start).
        settings = _settings("{}", service["environment"], tmp_path, monkeypatch)
        urls.add((settings.database.url, settings.limits.redis_url))
        assert service["image"] == replicas[0]["image"]
        assert service["read_only"] is True and service["tmpfs"] == [CONTAINER_TMP]
    # One database and one Redis for all, and those are this file's own services.
    ((database_url, redis_url),) = urls
    assert re.match(r"postgresql\+asyncpg://[^@]+@postgres:5432/", database_url)
    assert redis_url is not None and redis_url.startswith("redis://redis:6379/")
    assert settings.limits.expected_instances == len(replicas)

    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    published = set()
    workdir = _image_workdir()
    for replica in replicas:
        # Serving only, once the schema is there, on the port the healthcheck probes.
        assert replica["command"][0] == "serve"
        port = replica["command"][replica["command"].index("--port") + 1]
        assert replica["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert f"127.0.0.1:{port}/health/ready" in " ".join(replica["healthcheck"]["test"])
        host_port, container_port = replica["ports"][0].split(":")
        assert container_port == port
        published.add(host_port)
        # Journals of their own, in a volume (two replicas must not share one).
        (volume,) = replica["volumes"]
        assert volume.endswith(f":{workdir / 'var'}")
        assert int(replica["stop_grace_period"].removesuffix("s")) > DEFAULT_DRAIN_GRACE_S + DEFAULT_DRAIN_TIMEOUT_S
    assert len(published) == 2
    assert replicas[0]["volumes"] != replicas[1]["volumes"]
    for service in services.values():
        for dependency, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck to wait for"


def _excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule, as far as this project uses it: the last pattern matching the path
    or one of its parent folders decides, and `!` takes back in."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for pattern in patterns:
        glob = pattern.removeprefix("!")
        if any(fnmatch.fnmatchcase(prefix, g) for prefix in prefixes for g in {glob, glob.removeprefix("**/")}):
            excluded = not pattern.startswith("!")
    return excluded


def test_every_file_the_dockerfile_copies_is_in_the_build_context() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = []
    for line in _dockerfile().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert "requirements.lock" in sources and "deploy/lock.py" in sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _excluded(source, patterns), f"{source} is left out of the build context by .dockerignore"
    assert _excluded("tests/test_manifests.py", patterns) and _excluded("deploy/kubernetes/deployment.yaml", patterns)
    assert _excluded("app/__pycache__/x.pyc", patterns)
