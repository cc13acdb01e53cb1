"""Renders helm/switchyard and reads back what a gateway or feed pod would get:
its switchyard.toml (from the ConfigMap) and its environment (from the container
spec, with Secret references resolved from the rendered Secrets, or a stand-in
for Secrets the release expects to exist). Used by helm-check.py and
image-smoke.py."""

import base64
import os
import subprocess

import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helm", "switchyard")
RELEASE = "sy"
NAMESPACE = "switchyard"

# What a pod sees for fieldRefs, and for a key of a Secret the release does not own.
FIELDS = {"metadata.name": "sy-switchyard-7d9c-abcde", "status.podIP": "10.1.2.3"}
EXTERNAL_SECRET = "external-secret-value-0123456789"


def helm(*args, env=None):
    """Runs helm; returns (exit code, stdout, stderr)."""
    p = subprocess.run(
        [os.environ.get("HELM", "helm"), *args], capture_output=True, text=True, env=env
    )
    return p.returncode, p.stdout, p.stderr


def render(values_files=(), sets=(), kube_version=None, api_versions=()):
    """`helm template` of the chart; returns (code, docs, stdout, stderr)."""
    args = ["template", RELEASE, CHART, "--namespace", NAMESPACE]
    for f in values_files:
        args += ["-f", f]
    for s in sets:
        args += ["--set", s]
    if kube_version:
        args += ["--kube-version", kube_version]
    for a in api_versions:
        args += ["--api-versions", a]
    code, out, err = helm(*args)
    docs = [d for d in yaml.safe_load_all(out) if d] if code == 0 else []
    return code, docs, out, err


def find(docs, kind, name=None):
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def secret_value(docs, name, key):
    for s in find(docs, "Secret", name):
        data = s.get("data") or {}
        if key in data:
            return base64.b64decode(data[key]).decode()
        if key in (s.get("stringData") or {}):
            return s["stringData"][key]
        raise KeyError(f"Secret {name} has no key {key}")
    return EXTERNAL_SECRET


def expand(value, env):
    """Kubernetes' $(VAR) expansion of earlier variables."""
    for k, v in env.items():
        value = value.replace(f"$({k})", v)
    return value


def container(docs, deployment):
    d = find(docs, "Deployment", deployment)
    if not d:
        raise KeyError(f"no Deployment {deployment}")
    return d[0]["spec"]["template"]["spec"]["containers"][0]


def pod_env(docs, deployment):
    """The environment of the Deployment's first container, resolved."""
    env = {}
    for e in container(docs, deployment).get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e["valueFrom"]:
            env[e["name"]] = FIELDS[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secret_value(docs, ref["name"], ref["key"])
    return env


def config_toml(docs):
    cms = [c for c in find(docs, "ConfigMap") if "switchyard.toml" in (c.get("data") or {})]
    if len(cms) != 1:
        raise KeyError(f"expected one ConfigMap with switchyard.toml, found {len(cms)}")
    return cms[0]["data"]["switchyard.toml"]


def materialize(docs, deployment, root, rewrite=True):
    """Writes the files the pod mounts under /etc/switchyard into `root`, and returns
    (the config file written, environment); with `rewrite`, /etc/switchyard paths in both point
    into `root` (to run the binary on this host), else they stay (a container mounts
    the files there)."""
    into = root.rstrip("/") + "/" if rewrite else "/etc/switchyard/"
    os.makedirs(root, exist_ok=True)
    c = container(docs, deployment)
    pod = find(docs, "Deployment", deployment)[0]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in c.get("volumeMounts", []):
        v = volumes[m["name"]]
        target = os.path.join(root, os.path.relpath(m["mountPath"], "/etc/switchyard"))
        if "configMap" in v:
            config_path = target
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w") as f:
                f.write(config_toml(docs).replace("/etc/switchyard/", into))
        else:
            os.makedirs(target, exist_ok=True)
            for item in v["secret"]["items"]:
                with open(os.path.join(target, item["path"]), "w") as f:
                    f.write(secret_value(docs, v["secret"]["secretName"], item["key"]))
    env = {k: v.replace("/etc/switchyard/", into) for k, v in pod_env(docs, deployment).items()}
    return config_path, env
