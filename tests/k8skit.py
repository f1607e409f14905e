"""The Kubernetes manifests of ``deploy/k8s`` played on one machine with ``podman play kube``
(podman 4.3), for tests/test_k8s.py.

The manifests stay real Kubernetes YAML; :func:`podman_variant` derives, in memory, what podman
4.3 can run on one host next to processes on free localhost ports, and nothing else:

- every name gets a per-run prefix: podman makes pods, named volumes (the PersistentVolumeClaims,
  ConfigMap and emptyDir volumes) and secrets host-wide, so a run never touches another's;
- host networking, so the pods reach each other, RabbitMQ and Orthanc on 127.0.0.1 (there is no
  Service or cluster DNS); hence free ports: the ConfigMap's serve.yaml, the containers' ports
  and one HTTP port per pod, and a Deployment of N replicas becomes N one-replica Deployments,
  because replicas of one template would all bind the same host port;
- ``kind: Secret`` is played by the test itself: podman 4.3 stores such a document as a secret
  that its own ``secretKeyRef`` cannot parse (it wants a JSON map of base64 values), and a secret
  volume makes it panic (``VolumeFromSecret``, nil pointer). The test creates the secrets for
  ``secretKeyRef`` (:func:`podman_secret_json`) and mounts secret volumes as ``hostPath`` folders
  with the same files;
- on the host network podman 4.3 refuses the port mappings it makes of ``ports``, so they go and
  the probes name their ports by number;
- Services and the HorizontalPodAutoscaler are dropped (podman ignores them);
- the images are the locally built test tags.
"""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
NOT_PLAYED = {"Service", "HorizontalPodAutoscaler", "Secret"}


def manifests() -> list[dict]:
    """Every document of the files ``kustomization.yaml`` lists, in its order."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = []
    for name in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def secret_items(doc: dict) -> dict[str, bytes]:
    """A Secret's keys and values (``data`` is base64, ``stringData`` plain)."""
    items = {k: base64.b64decode(v) for k, v in (doc.get("data") or {}).items()}
    items.update({k: v.encode() for k, v in (doc.get("stringData") or {}).items()})
    return items


def podman_secret_json(items: dict[str, bytes]) -> bytes:
    """The form podman 4.3's ``secretKeyRef`` reads: a JSON map of base64 values."""
    return json.dumps({k: base64.b64encode(v).decode() for k, v in items.items()}).encode()


def serve_yaml(docs: list[dict]) -> dict:
    (cfg,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "ctpipe-config"
    ]
    return yaml.safe_load(cfg["data"]["serve.yaml"])


def podman_variant(
    docs: list[dict],
    prefix: str,
    serve_changes: dict,
    http_ports: dict[str, list[int]],
    rabbitmq_env: dict[str, str],
    amqp_port: int,
    secret_dirs: dict[str, Path],
    images: dict[str, str],
) -> list[dict]:
    """The documents podman plays (see the module docstring). ``serve_changes``: top-level keys
    of serve.yaml replaced (a dict value updates that section); ``http_ports``: Deployment name ->
    one port per replica; ``secret_dirs``: Secret name -> folder with its files; ``images``: image
    in the manifests -> local tag."""
    out = []
    for doc in copy.deepcopy(docs):
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind in NOT_PLAYED:
            continue
        doc["metadata"]["name"] = prefix + name
        if kind == "ConfigMap" and name == "ctpipe-config":
            cfg = yaml.safe_load(doc["data"]["serve.yaml"])
            for key, value in serve_changes.items():
                if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                    cfg[key].update(value)
                else:
                    cfg[key] = value
            doc["data"]["serve.yaml"] = yaml.safe_dump(cfg)
        if kind != "Deployment":
            out.append(doc)
            continue
        pod = doc["spec"]["template"]["spec"]
        _localise_pod(pod, prefix, secret_dirs, images)
        (container,) = pod["containers"]
        if name == "rabbitmq":
            container["env"] += [{"name": k, "value": v} for k, v in rabbitmq_env.items()]
            container["ports"] = [{**p, "containerPort": amqp_port} for p in container["ports"]]
        ports = http_ports.get(name, [None])
        for i, port in enumerate(ports):
            one = copy.deepcopy(doc)
            one["spec"]["replicas"] = 1
            if len(ports) > 1:
                one["metadata"]["name"] = f"{prefix}{name}-{i}"
            if port is not None:
                (c,) = one["spec"]["template"]["spec"]["containers"]
                c["args"] = [*c.get("args", []), "--http-port", str(port)]
                c["ports"] = [
                    {**p, "containerPort": port} if p["name"] == "https" else p for p in c["ports"]
                ]
            for c in one["spec"]["template"]["spec"]["containers"]:
                _probes_by_number(c)
            out.append(one)
    return out


def _probes_by_number(container: dict) -> None:
    """On the host network podman 4.3 refuses port mappings, which it makes of ``ports``: the
    probes name their port by number and ``ports`` goes (the host's ports are the pod's)."""
    ports = pod_ports(container)
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        check = container.get(probe, {})
        for how in ("httpGet", "tcpSocket"):
            if how in check:
                check[how]["port"] = ports[check[how]["port"]]
    container.pop("ports", None)


def _localise_pod(pod: dict, prefix: str, secret_dirs: dict[str, Path], images: dict) -> None:
    pod["hostNetwork"] = True
    for volume in pod["volumes"]:
        if "secret" in volume:
            source = secret_dirs[volume.pop("secret")["secretName"]]
            volume["hostPath"] = {"path": str(source), "type": "Directory"}
        elif "configMap" in volume:
            volume["configMap"]["name"] = prefix + volume["configMap"]["name"]
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]
            claim["claimName"] = prefix + claim["claimName"]
        if "emptyDir" in volume:  # podman 4.3 makes a named volume of the volume's name
            old = volume["name"]
            volume["name"] = prefix + old
            for c in pod["containers"]:
                for mount in c.get("volumeMounts", []):
                    if mount["name"] == old:
                        mount["name"] = prefix + old
    for c in pod["containers"]:
        c["image"] = images.get(c["image"], c["image"])
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                ref["name"] = prefix + ref["name"]


def pod_ports(container: dict) -> dict:
    """Port name and number -> number, of what a container exposes."""
    ports = {}
    for p in container.get("ports", []):
        ports[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports
