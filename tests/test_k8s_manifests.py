"""deploy/k8s/: every manifest validates against the Kubernetes schemas, and the pieces agree.

The schemas are kubernetes-validate's bundled ones (offline), in strict mode (an unknown
field is an error, as `kubectl apply --validate=strict` makes it) for KUBERNETES_VERSION.
The cross-checks catch what a schema cannot: a probe on a port the gateway does not
listen on, a grace period shorter than the drain, a Service that selects no pod.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import Config, loads

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"  # the base: gateway + sample user-api
K8S_HA = DEPLOY / "k8s-ha"  # an overlay of it: several replicas on the Consul KV store
KUBERNETES_VERSION = "1.30.0"  # kubernetes-validate ships strict schemas for 1.25 .. 1.37
TOKEN_PLACEHOLDER = "replace-me-with-a-long-random-token"
IMAGE_CONFIG = "/etc/gateway/gateway.yaml"  # the Dockerfile's ENTRYPOINT reads this
IMAGE_UID = 10001  # the Dockerfile's `useradd --uid`

Doc = dict[str, Any]


def _manifest_files() -> list[Path]:
    return sorted(
        p for d in (K8S, K8S_HA) for p in d.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def _docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kustomizations() -> list[Path]:
    return sorted(DEPLOY.rglob("kustomization.yaml"))


def _rendered(directory: Path) -> list[Doc]:
    """What `kubectl apply -k directory` applies: resources, then patches that replace
    a whole document (a ConfigMap) or apply a JSON 6902 `replace` (the ones used here)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for res in kust.get("resources", []):
        target = (directory / res).resolve()
        docs.extend(_rendered(target) if target.is_dir() else _docs(target))
    for patch in kust.get("patches", []):
        if "path" in patch:
            for new in _docs(directory / patch["path"]):
                i = _index(docs, new["kind"], new["metadata"]["name"])
                assert new["kind"] == "ConfigMap", "only whole ConfigMaps are patched by file"
                docs[i] = new
        else:
            t = patch["target"]
            i = _index(docs, t["kind"], t["name"])
            for op in yaml.safe_load(patch["patch"]):
                assert op["op"] == "replace", op
                *parents, leaf = op["path"].strip("/").split("/")
                node = docs[i]
                for part in parents:
                    node = node[part]
                assert leaf in node, op["path"]
                node[leaf] = op["value"]
    return docs


def _index(docs: list[Doc], kind: str, name: str) -> int:
    found = [i for i, d in enumerate(docs) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    return docs[_index(docs, kind, name)]


def _of_kind(docs: list[Doc], kind: str) -> Iterator[Doc]:
    return (d for d in docs if d["kind"] == kind)


def _config(docs: list[Doc]) -> tuple[str, Config]:
    text = _one(docs, "ConfigMap", "gray-gateway-config")["data"]["gateway.yaml"]
    return text, loads(text, env={"GATEWAY_ADMIN_TOKEN": TOKEN_PLACEHOLDER})


def _gateway(docs: list[Doc]) -> tuple[Doc, Doc]:
    dep = _one(docs, "Deployment", "gray-gateway")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, container


SETUPS = [K8S, K8S_HA]
SETUP_IDS = ["base", "ha"]


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_validates_strictly(path: Path) -> None:
    docs = _docs(path)
    assert docs, path
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_refuses_an_unknown_field() -> None:
    """The check above can fail: a misspelt probe field is an error in strict mode."""
    dep, container = _gateway(_docs(K8S / "gateway-deployment.yaml"))
    container["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError, match="periodSecond"):
        kubernetes_validate.validate(dep, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kust", _kustomizations(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_the_kustomization_lists_every_file_of_its_folder(kust: Path) -> None:
    spec = yaml.safe_load(kust.read_text())
    assert spec["kind"] == "Kustomization"
    listed = [
        *spec.get("resources", []),
        *(p["path"] for p in spec.get("patches", []) if "path" in p),
    ]
    for name in listed:
        assert (kust.parent / name).exists(), name
    files = {p.name for p in kust.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert files == {n for n in listed if not n.startswith("..")}
    for name in spec.get("resources", []):
        target = (kust.parent / name).resolve()
        if target.is_dir():  # a base: kustomize refuses one that contains the overlay
            assert (target / "kustomization.yaml").exists(), name
            assert not kust.parent.resolve().is_relative_to(target), name


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_the_configmap_config_passes_gateway_check(setup: Path, tmp_path: Path) -> None:
    text, _ = _config(_rendered(setup))
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    env = {**os.environ, "GATEWAY_ADMIN_TOKEN": TOKEN_PLACEHOLDER}
    argv = [sys.executable, "-m", "gateway", "check", "--no-bind", str(config)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout
    # ... and the admin listener it asks for is refused without the Secret's token.
    env.pop("GATEWAY_ADMIN_TOKEN")
    bad = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert bad.returncode == 2 and "admin.listen" in bad.stdout + bad.stderr


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_the_grace_period_outlasts_prestop_and_drain(setup: Path) -> None:
    docs = _rendered(setup)
    _, config = _config(docs)
    dep, container = _gateway(docs)
    grace = dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    assert grace > pre_stop + config.drain_timeout
    # /healthz fails from SIGTERM on: liveness must not restart a draining pod.
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > config.drain_timeout


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_probes_and_ports_match_the_config_listeners(setup: Path) -> None:
    docs = _rendered(setup)
    _, config = _config(docs)
    _, container = _gateway(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.listen.port, "admin": config.admin.listen.port}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == config.listen.port


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_config_secret_and_state_are_mounted_where_the_image_and_config_expect(
    setup: Path,
) -> None:
    docs = _rendered(setup)
    _, config = _config(docs)
    dep, container = _gateway(docs)
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    config_dir, config_name = IMAGE_CONFIG.rsplit("/", 1)
    assert volumes[mounts[config_dir]]["configMap"]["name"] == "gray-gateway-config"
    assert config_name in _one(docs, "ConfigMap", "gray-gateway-config")["data"]
    (env,) = [e for e in container["env"] if e["name"] == config.admin.token_env]
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["key"] in _one(docs, "Secret", ref["name"])["stringData"]
    # A read-only root: the file store's path lies on an emptyDir.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    if config.state.store == "file":
        state_dir = str(Path(config.state.path).parent)
        assert "emptyDir" in volumes[mounts[state_dir]]
    else:
        assert config.state.store == "consul" and dep["spec"]["replicas"] >= 2


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_the_gateway_runs_as_the_images_non_root_user_without_capabilities(setup: Path) -> None:
    dep, container = _gateway(_rendered(setup))
    pod = dep["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == IMAGE_UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    assert "limits" in container["resources"] and "requests" in container["resources"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"--uid {IMAGE_UID}" in dockerfile


def _selects(selector: dict[str, str], dep: Doc) -> bool:
    labels = dep["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("setup", SETUPS, ids=SETUP_IDS)
def test_labels_selectors_and_service_ports_match(setup: Path) -> None:
    docs = _rendered(setup)
    deployments = list(_of_kind(docs, "Deployment"))
    for dep in deployments:
        assert _selects(dep["spec"]["selector"]["matchLabels"], dep), dep["metadata"]["name"]
    for svc in _of_kind(docs, "Service"):
        chosen = [d for d in deployments if _selects(svc["spec"]["selector"], d)]
        assert len(chosen) == 1, svc["metadata"]["name"]
        (container,) = chosen[0]["spec"]["template"]["spec"]["containers"]
        names = {p["name"]: p["containerPort"] for p in container["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names or port["targetPort"] in names.values(), port
    for pdb in _of_kind(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        pods = [d for d in deployments if _selects(sel, d)]
        assert [d["metadata"]["name"] for d in pods] == ["gray-gateway"]
        assert pdb["spec"]["minAvailable"] < min(
            pods[0]["spec"]["replicas"],
            *(h["spec"]["minReplicas"] for h in _of_kind(docs, "HorizontalPodAutoscaler")),
        )
    for hpa in _of_kind(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        _one(docs, ref["kind"], ref["name"])


@pytest.mark.parametrize(
    ("release", "path"),
    [("stable", "deploy-stable.yaml"), ("gray", "deploy-gray.yaml")],
    ids=["stable", "gray"],
)
def test_each_release_is_a_labelled_deployment_whose_service_the_config_names(
    release: str, path: str
) -> None:
    docs = _docs(K8S / path)
    (dep,) = _of_kind(docs, "Deployment")
    (svc,) = _of_kind(docs, "Service")
    assert dep["spec"]["template"]["metadata"]["labels"]["release"] == release
    assert dep["metadata"]["labels"]["release"] == release
    assert svc["spec"]["selector"] == {"app": "user-api", "release": release}
    for setup in SETUPS:
        _, config = _config(_rendered(setup))
        (endpoint,) = config.services["user-api"].releases[release].upstreams
        assert (endpoint.host, endpoint.port) == (
            svc["metadata"]["name"],
            svc["spec"]["ports"][0]["port"],
        )
    assert _config(_rendered(K8S))[1].services["user-api"].releases["gray"].weight == 0


README = (ROOT / "README.md").read_text()
SECTION = re.search(r"^## Kubernetes\n(.*?)(?=^## )", README, re.M | re.S)


def test_the_readme_walkthrough_names_real_files() -> None:
    assert SECTION is not None, 'README has no "Kubernetes" section'
    text = SECTION.group(1)
    named = set(re.findall(r"deploy/k8s[\w./-]*", text))
    assert named, "the walk-through names no file"
    for name in named:
        assert (ROOT / name.rstrip(".")).exists(), name
    kubectl = [line for line in text.splitlines() if "kubectl " in line]
    assert any(" -k " in line for line in kubectl) and any(" -f " in line for line in kubectl)
    for line in kubectl:
        for flag, target in re.findall(r"\s(-f|-k)\s+([\w./-]+)", line):
            if target == "-":
                continue
            path = ROOT / target
            assert path.exists(), line
            if flag == "-k":
                assert (path / "kustomization.yaml").exists(), line
