"""deploy/: the Kubernetes manifests, the Dockerfile and compose.yaml, checked by their own linters
and against a real sidecrypt: the rendered pod's probes reach the admin endpoints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kms_server import REGION, KmsServer
from sidecrypt import __version__, config

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DEPLOYMENTS = ("deployment.yaml", "deployment-native-sidecar.yaml")
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """A linter from the test extra (next to this Python) or the system; in CI, missing fails."""
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return found


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def sidecrypt_container(deployment: dict[str, Any]) -> dict[str, Any]:
    spec = deployment["spec"]["template"]["spec"]
    every = spec.get("initContainers", []) + spec["containers"]
    return next(c for c in every if c["name"] == "sidecrypt")


def pod_config() -> dict[str, Any]:
    (configmap,) = docs(K8S / "configmap.yaml")
    raw: dict[str, Any] = yaml.safe_load(configmap["data"]["sidecrypt.yaml"])
    return raw


def test_manifests_pass_kubernetes_validate() -> None:
    files = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = result.stdout.count(" passed for resource ")
    assert passed == sum(len(docs(f)) for f in files), result.stdout


def test_kustomizations_list_files_that_exist() -> None:
    for kustomization in K8S.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            assert (kustomization.parent / resource).is_file(), (kustomization, resource)


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_pod_runs_sidecrypt_by_the_book(name: str) -> None:
    (deployment,) = docs(K8S / name)
    pod = deployment["spec"]["template"]["spec"]
    side = sidecrypt_container(deployment)
    if name == "deployment-native-sidecar.yaml":
        assert side in pod["initContainers"] and side["restartPolicy"] == "Always"
    assert side["image"].endswith(f":{__version__}")
    for container in pod.get("initContainers", []) + pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["runAsNonRoot"] and ctx["readOnlyRootFilesystem"], container["name"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"], container["name"]
    for volume in pod["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o400, volume["name"]
    mounts = {m["mountPath"] for m in side["volumeMounts"]}
    assert "/tmp" in mounts  # the worker supervisor's socket directory on a read-only root
    env = {e["name"]: e for e in side["env"]}
    assert "secretKeyRef" in env["SIDECRYPT_AUDIT_HMAC_KEY"]["valueFrom"]
    text = (K8S / name).read_text()
    assert not re.search(r"AWS_(SECRET_)?ACCESS_KEY", text), "KMS credentials come from IRSA"


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_probes_and_scrape_target_point_at_the_admin_listener(name: str) -> None:
    (deployment,) = docs(K8S / name)
    side = sidecrypt_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    settings = config.parse(pod_config(), file="configmap.yaml")
    assert settings.admin.address is not None
    host, _, port = settings.admin.address.rpartition(":")
    assert host == "0.0.0.0" and int(port) == ports["admin"]  # the kubelet probes the pod IP
    assert side["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(notes["prometheus.io/port"]) == ports["admin"]
    assert notes["prometheus.io/path"] == "/metrics"


@pytest.fixture
def kms(moto: KmsServer, aws_env: None) -> Iterator[KmsServer]:
    moto.fresh_key(alias=pod_config()["keys"]["app"]["key_id"])
    yield moto


async def test_rendered_pod_answers_its_probes(
    kms: KmsServer,
    proxy_factory: Callable[..., Awaitable[Any]],
    upstream: Any,
    certs: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ConfigMap's config, mounted as the Deployment mounts it, serves /healthz and /readyz."""
    raw = pod_config()
    tls_dir = tmp_path / "etc" / "sidecrypt" / "tls"
    tls_dir.mkdir(parents=True)
    shutil.copy(certs.server_cert, tls_dir / "tls.crt")
    shutil.copy(certs.server_key, tls_dir / "tls.key")
    (tls_dir / "tls.key").chmod(0o400)
    raw["listen"]["tls"] = {
        k: str(tmp_path / v.lstrip("/")) for k, v in raw["listen"]["tls"].items()
    }
    raw["listen"]["address"] = "127.0.0.1:0"
    raw["admin"]["address"] = "127.0.0.1:0"  # 0.0.0.0:9901 in the pod; any free port here
    raw["upstream"]["url"] = upstream.url  # the app container
    raw["keys"]["app"]["endpoint_url"] = kms.url
    raw["keys"]["app"]["region"] = REGION
    monkeypatch.setenv("SIDECRYPT_AUDIT_HMAC_KEY", "a-test-only-audit-key-32-bytes!!")
    proxy = await proxy_factory(raw)
    (deployment,) = docs(K8S / "deployment.yaml")
    side = sidecrypt_container(deployment)
    async with aiohttp.ClientSession() as session:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = side[probe]["httpGet"]["path"]
            async with session.get(proxy.admin_url + path, timeout=aiohttp.ClientTimeout(10)) as r:
                assert r.status == 200, (probe, await r.text())


def test_dockerfile_passes_hadolint_and_installs_this_version() -> None:
    dockerfile = ROOT / "Dockerfile"
    result = subprocess.run(
        [tool("hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert f"sidecrypt[kms,jwt]=={__version__}" in text
    assert "--constraint" in text and "USER 10001" in text and "HEALTHCHECK" in text
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert all(re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", b) for b in bases), bases


def test_constraints_pin_every_runtime_dependency() -> None:
    pins = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert all(
        "==" in line
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for needed in ("aiohttp", "cryptography", "pluggy", "pydantic", "aiobotocore", "joserfc"):
        assert needed in pins


def test_compose_stack_wires_the_demo() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert {"app", "kms", "sidecrypt"} <= services.keys()
    side = services["sidecrypt"]
    assert side["read_only"] is True
    assert all(p.startswith("127.0.0.1:") for p in side["ports"])
    assert side["depends_on"]["kms-init"]["condition"] == "service_completed_successfully"
    mounted = side["volumes"][0].split(":")[0]
    raw = yaml.safe_load((ROOT / mounted).read_text())
    settings = config.parse(raw, file=mounted)
    assert settings.upstream.url == "http://app:8080"
    assert raw["keys"]["app"]["endpoint_url"] == "http://kms:5000"
