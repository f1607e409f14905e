"""The Kubernetes manifests (deploy/k8s): every document checked for structure, the ConfigMap's
serve.yaml checked by the node's own config schema, and the whole set run with ``podman play kube``
(podman 4.3, a variant derived in memory: tests/k8skit.py): RabbitMQ, a receiver and two workers as
pods on a shared volume, a study sent to the receiver by DICOM TLS, SEG and SR back in Orthanc
from a worker pod.

The node's image is the one tests/test_container.py builds (tests/imagekit.py, same tag, reused
while its inputs are unchanged); the RabbitMQ image is built from deploy/rabbitmq the same way.
Skipped without podman, runc, debootstrap or root, or without Orthanc, with the install command.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import secrets
import shutil
import ssl
import subprocess
import uuid
from pathlib import Path

import httpx
import imagekit
import pydicom
import pytest
import yaml
from imagekit import USER_ID, podman
from k8skit import K8S, ROOT, manifests, pod_ports, podman_secret_json, podman_variant, secret_items
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from servekit import Orthanc, free_port, make_certs, make_tokens, wait_for

from ctpipe.serve import config, tokens

ctpipe_image = imagekit.ctpipe_image  # the session fixture: the node's image, built once
RABBITMQ_TAG = "localhost/ctpipe-rabbitmq:test"
_spec = importlib.util.spec_from_file_location("build_image", ROOT / "scripts" / "build_image.py")
build_image = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_image)  # its BASE: the Debian base both images start from
LABEL = "org.ctpipe.inputs"
ORTHANC_MISSING = pytest.mark.skipif(
    shutil.which("Orthanc") is None,
    reason="needs Orthanc: apt-get install -y orthanc (.ci/run does)",
)


def all_documents() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in K8S.glob("*.yaml")}


def test_every_manifest_is_kubernetes_yaml_with_probes_on_exposed_ports():
    files = all_documents()
    assert {"kustomization.yaml", "keda-scaledobject.yaml"} < set(files)
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(set(files) - {"kustomization.yaml", "keda-scaledobject.yaml"})
    docs = [d for name, ds in files.items() if name != "kustomization.yaml" for d in ds]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
        assert doc["metadata"].get("name"), doc
    by_kind: dict[str, dict[str, dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    deployments = by_kind["Deployment"]
    assert set(deployments) == {"ctpipe-receiver", "ctpipe-worker", "rabbitmq"}
    assert deployments["ctpipe-worker"]["spec"]["replicas"] == 2
    for name, dep in deployments.items():
        template = dep["spec"]["template"]
        assert (
            dep["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        )
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            ports = pod_ports(c)
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                if probe in c:
                    check = c[probe].get("httpGet") or c[probe]["tcpSocket"]
                    assert check["port"] in ports, (name, probe)
            if name != "rabbitmq":
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
            sec = c["securityContext"]
            assert sec["capabilities"]["drop"] == ["ALL"] and sec["readOnlyRootFilesystem"]
            assert sec["allowPrivilegeEscalation"] is False
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][part]), (name, part)
            for mount in c["volumeMounts"]:
                assert mount["name"] in volumes, (name, mount)
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret_items(by_kind["Secret"][ref["name"]]), ref
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in by_kind["ConfigMap"]
            if "secret" in v:
                assert v["secret"]["secretName"] in by_kind["Secret"]
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in by_kind["PersistentVolumeClaim"]
    for name, svc in by_kind["Service"].items():
        (dep,) = [
            d for d in deployments.values()
            if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]  # fmt: skip
        exposed = pod_ports(dep["spec"]["template"]["spec"]["containers"][0])
        assert all(p["targetPort"] in exposed for p in svc["spec"]["ports"]), name
    spool = by_kind["PersistentVolumeClaim"]["ctpipe-spool"]
    assert spool["spec"]["accessModes"] == ["ReadWriteMany"]
    hpa = by_kind["HorizontalPodAutoscaler"]["ctpipe-worker"]
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    keda = by_kind["ScaledObject"]["ctpipe-worker"]
    (trigger,) = keda["spec"]["triggers"]
    assert trigger["metadata"]["queueName"] == config.Queue().name
    assert "nvidia.com/gpu: 1" in (K8S / "worker.yaml").read_text()  # the commented variant


def test_configmap_serve_yaml_passes_the_node_config_check(tmp_path, monkeypatch):
    """Checked as the pods see it: the Secrets' files at their mount paths (under tmp_path here),
    the AMQP password in the environment; and the placeholder tokens never start a node."""
    docs = manifests()
    raw = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["serve.yaml"])
    mounts = {"ctpipe-secrets": "/etc/ctpipe/secrets", "ctpipe-tls": "/etc/ctpipe/tls"}
    text = yaml.safe_dump(raw)
    for doc in (d for d in docs if d["kind"] == "Secret"):
        folder = tmp_path / doc["metadata"]["name"]
        folder.mkdir()
        for key, value in secret_items(doc).items():
            (folder / key).write_bytes(value)
        text = text.replace(mounts[doc["metadata"]["name"]], str(folder))
    monkeypatch.setenv("CTPIPE_AMQP_PASSWORD", "from-the-secret")
    cfg = config.parse(yaml.safe_load(text), source="deploy/k8s/configmap.yaml")
    assert cfg.queue.kind == "rabbitmq" and cfg.host == "0.0.0.0"
    assert cfg.dicom.tls and cfg.http.tls  # the listeners leave the pod: TLS
    with pytest.raises(tokens.TokenError, match="tokens"):
        tokens.load(cfg.http.tokens_file)
    monkeypatch.delenv("CTPIPE_AMQP_PASSWORD")
    with pytest.raises(config.ConfigError, match="CTPIPE_AMQP_PASSWORD"):
        config.parse(yaml.safe_load(text))


def rabbitmq_image() -> str:
    """The broker's image, built from deploy/rabbitmq unless one of the same inputs exists."""
    folder = ROOT / "deploy" / "rabbitmq"
    base = subprocess.run(podman("image", "inspect", "--format", "{{.Id}}", build_image.BASE),
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    digest = hashlib.sha256(base.encode())
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    wanted = digest.hexdigest()
    fmt = '{{ index .Config.Labels "' + LABEL + '" }}'
    have = subprocess.run(podman("image", "inspect", "--format", fmt, RABBITMQ_TAG),
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    if have != wanted:
        subprocess.run(
            podman("build", "--isolation", "chroot", "--build-arg", f"BASE={build_image.BASE}",
                   "--label", f"{LABEL}={wanted}", "-t", RABBITMQ_TAG, str(folder)),
            check=True, capture_output=True,
        )  # fmt: skip
    return RABBITMQ_TAG


class Played:
    """The variant of deploy/k8s running under ``podman play kube``, with Orthanc as the PACS."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.prefix = tmp, f"k8s{uuid.uuid4().hex[:6]}-"
        self.file, self.secret_dirs = tmp / "play.yaml", {}
        self.orthanc = self.client = None

    def start(self, node_image: str) -> None:
        tmp, docs = self.tmp, manifests()
        self.orthanc = Orthanc(tmp / "orthanc", {})
        self.certs = make_certs(tmp / "certs")
        ctx = ssl.create_default_context(cafile=self.certs["ca"])
        self.client = httpx.Client(verify=ctx, timeout=10)
        self._secrets(docs)
        self.dicom_port, self.amqp_port = free_port(), free_port()
        self.http = {"ctpipe-receiver": [free_port()], "ctpipe-worker": [free_port(), free_port()]}
        serve = {
            "host": "127.0.0.1",
            "quiet_seconds": 1,
            "dicom": {"port": self.dicom_port, "allowed_callers": [{"ae_title": "TESTSCU"}]},
            "destination": {"kind": "dicom", "ae_title": "ORTHANC", "host": "127.0.0.1",
                            "port": self.orthanc.dicom_port, "tls": None},  # Orthanc: plain, on loopback
            "retry": {"first_seconds": 0.5, "max_seconds": 2, "max_attempts": 50},
            "queue": {"url": f"amqp://ctpipe@127.0.0.1:{self.amqp_port}/%2F"},
        }  # fmt: skip
        erlang = {
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_PORT": str(free_port()),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }  # its own epmd: never the one of a broker other tests run on this host
        images = {"localhost/ctpipe:latest": node_image,
                  "localhost/ctpipe-rabbitmq:latest": rabbitmq_image()}  # fmt: skip
        variant = podman_variant(
            docs, self.prefix, serve, self.http, erlang, self.amqp_port, self.secret_dirs, images
        )
        self.file.write_text(yaml.safe_dump_all(variant))
        played = subprocess.run(
            podman("play", "kube", str(self.file)), capture_output=True, text=True
        )
        if played.returncode != 0:
            self.close()
            raise AssertionError(f"podman play kube: {played.stdout}{played.stderr}")

    def _secrets(self, docs: list[dict]) -> None:
        """Test values for the manifests' Secrets, with the same keys: a hostPath folder each
        (owned by the node's user, as a Secret volume with fsGroup is) and a podman secret."""
        folder = self.tmp / "secrets"
        self.token = make_tokens(folder / "tokens", {"test": ["store", "read", "metrics"]})["test"]
        values = {
            "ctpipe-secrets": {
                "tokens.yaml": (folder / "tokens" / "tokens.yaml").read_bytes(),
                "amqp-password": secrets.token_urlsafe(18).encode(),
            },
            "ctpipe-tls": {
                "tls.crt": self.certs["server"].read_bytes(),
                "tls.key": self.certs["server_key"].read_bytes(),
                "ca.crt": self.certs["ca"].read_bytes(),
            },
        }
        dirs = self.secret_dirs
        for doc in (d for d in docs if d["kind"] == "Secret"):
            name = doc["metadata"]["name"]
            assert set(values[name]) == set(secret_items(doc)), name  # the manifests' keys
            dirs[name] = folder / name
            dirs[name].mkdir(mode=0o750)
            os.chown(dirs[name], USER_ID, USER_ID)
            for key, value in values[name].items():
                (dirs[name] / key).write_bytes(value)
                os.chmod(dirs[name] / key, 0o440)
                os.chown(dirs[name] / key, USER_ID, USER_ID)
            subprocess.run(podman("secret", "create", self.prefix + name, "-"),
                           input=podman_secret_json(values[name]), check=True, capture_output=True)  # fmt: skip

    def url(self, deployment: str, path: str, i: int = 0) -> str:
        return f"https://127.0.0.1:{self.http[deployment][i]}{path}"

    def ready(self, deployment: str, i: int = 0) -> bool:
        try:
            return self.client.get(self.url(deployment, "/readyz", i)).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        out = []
        for name in self.containers():
            result = subprocess.run(
                podman("logs", "--tail", "30", name), capture_output=True, text=True
            )
            out.append(f"== {name}\n{result.stdout[-2500:]}{result.stderr[-2500:]}")
        return "\n".join(out)

    def containers(self) -> list[str]:
        listed = subprocess.run(
            podman("ps", "-a", "--format", "{{.Names}}"), capture_output=True, text=True
        )
        return [n for n in listed.stdout.split() if n.startswith(self.prefix)]

    def close(self) -> None:
        if self.file.is_file():
            subprocess.run(podman("play", "kube", "--down", str(self.file)), capture_output=True)
        listed = subprocess.run(
            podman("volume", "ls", "--format", "{{.Name}}"), capture_output=True, text=True
        )
        ours = [v for v in listed.stdout.split() if v.startswith(self.prefix)]
        if ours:
            subprocess.run(podman("volume", "rm", "-f", *ours), capture_output=True)
        for name in self.secret_dirs:
            subprocess.run(podman("secret", "rm", self.prefix + name), capture_output=True)
        if self.client is not None:
            self.client.close()
        if self.orthanc is not None:
            self.orthanc.close()


@pytest.fixture(scope="module")
def played(tmp_path_factory, ctpipe_image):
    cluster = Played(tmp_path_factory.mktemp("k8s"))
    try:
        cluster.start(ctpipe_image)
        for name, ports in cluster.http.items():
            for i in range(len(ports)):
                try:
                    wait_for(lambda n=name, j=i: cluster.ready(n, j), 240, f"{name}-{i} /readyz")
                except AssertionError as err:
                    raise AssertionError(f"{err}\n{cluster.logs()}") from None
        yield cluster
    finally:
        cluster.close()


def send_tls(played: Played, files: list[Path]) -> None:
    """C-STORE over DICOM TLS with the client certificate the receiver requires."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=played.certs["ca"])
    ctx.load_cert_chain(played.certs["client"], played.certs["client_key"])
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(
        "127.0.0.1", played.dicom_port, ae_title="CTPIPE", tls_args=(ctx, "localhost")
    )
    assert assoc.is_established
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            assert status and status.Status == 0x0000, path.name
    finally:
        assoc.release()


@imagekit.SKIP
@ORTHANC_MISSING
@pytest.mark.filterwarnings("ignore")
def test_play_kube_receiver_and_workers_return_seg_and_sr(played, write_tiny_cohort, tmp_path):
    write_tiny_cohort(tmp_path / "study", n=1, seed=41)
    files = sorted((tmp_path / "study").rglob("*.dcm"))
    send_tls(played, files)
    source = pydicom.dcmread(files[0], stop_before_pixels=True)

    def results():
        found = played.orthanc.post("/tools/lookup", source.StudyInstanceUID.encode())
        study = [f["ID"] for f in found if f["Type"] == "Study"]
        got = played.orthanc.results(study[0]) if study else {}
        return got if {"SEG", "SR"} <= set(got) else None

    try:
        got = wait_for(results, 300, "SEG and SR in Orthanc")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{played.logs()}") from None
    assert len(got["SEG"]) == 1 and len(got["SR"]) == 1
    for name, ports in played.http.items():  # every pod still ready, over HTTPS
        for i in range(len(ports)):
            body = played.client.get(played.url(name, "/readyz", i)).json()
            assert body["ready"] and body["broker"], (name, i, body)
    headers = {"Authorization": f"Bearer {played.token}"}
    jobs = played.client.get(played.url("ctpipe-receiver", "/jobs"), headers=headers).json()
    assert [j["status"] for j in jobs] == ["predicted"]
    # the pods run as the manifests say: the image's user, read-only root, no capabilities
    for name in played.containers():
        if name.endswith("-infra") or "infra" in name:
            continue
        fmt = "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}} {{len .HostConfig.CapAdd}}"
        inspected = subprocess.run(
            podman("inspect", "--format", fmt, name), capture_output=True, text=True
        )
        user, read_only, added = inspected.stdout.split()
        assert user.split(":")[0] in (str(USER_ID), "10002") and read_only == "true", name
        assert added == "0", name
