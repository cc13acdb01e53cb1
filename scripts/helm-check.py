#!/usr/bin/env python3
"""`make helm-check`: the chart linted, rendered for every values set that matters,
validated against Kubernetes 1.32 and 1.37 (and the ServiceMonitor CRD), our own
templates yamllinted, bad values refused by the schema, and, for every values
set, the rendered config and environment fed to the real binary's check-config,
for the gateway and the feed alike.

Usage: helm-check.py SWITCHYARD_BINARY   (HELM names the helm binary)"""

import json
import os
import subprocess
import sys
import tempfile

import jsonschema
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chart_render as chart  # noqa: E402

CI = os.path.join(chart.CHART, "ci")
CRD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helm", "vendor", "crds", "servicemonitors.yaml")
MONITORING = "monitoring.coreos.com/v1/ServiceMonitor"
KUBE_VERSIONS = ["1.32.0", "1.37.0"]
# Kinds no Kubernetes release ships a schema for (CRDs): checked apart, or only rendered.
CUSTOM_KINDS = {"ServiceMonitor", "HTTPRoute"}

# (name, values files, extra api versions)
SETS = [
    ("defaults", [], []),
    ("bundled", ["bundled.yaml"], []),
    ("external", ["external.yaml"], []),
    ("external-inline", ["external-inline.yaml"], []),
    ("servicemonitor", ["servicemonitor.yaml"], [MONITORING]),
    ("no-hpa", ["no-hpa.yaml"], []),
    ("single-node", ["single-node.yaml"], []),
]

# Values the chart must refuse: (why, --set arguments, text the error must contain).
BAD = [
    ("no replicas", ["replicaCount=0"], "replicaCount"),
    ("a drain timeout that is not a duration", ["config.server.drain_timeout=10"], "drain_timeout"),
    ("an HMAC secret shorter than 16 bytes", ["auth.hmacSecret=short"], "hmacSecret"),
    ("an image pull policy Kubernetes does not know", ["image.pullPolicy=Sometimes"], "pullPolicy"),
    ("an external NATS URL that is not nats://", ["nats.enabled=false", "externalNats.url=http://nats:4222"], "externalNats"),
    ("a stream with seven replicas", ["config.namespaces.chat.stream_replicas=7"], "stream_replicas"),
    ("a namespace option the gateway does not have", ["config.namespaces.chat.histroy_size=5"], "histroy_size"),
    ("a namespace name outside the channel grammar", ["config.namespaces.bad\\.name.history_size=1"], "bad.name"),
    ("the engine, which the chart chooses", ["config.engine.kind=memory"], "engine"),
    ("a listen address, which the chart sets", ["config.server.listen=0.0.0.0:9000"], "listen"),
    ("an idle timeout below the ping interval", ["ingress.idleTimeoutSeconds=10"], "idleTimeoutSeconds"),
    ("several gateways without a backbone", ["nats.enabled=false", "autoscaling.enabled=false", "replicaCount=3"], "backbone"),
    ("autoscaling without a backbone", ["nats.enabled=false", "replicaCount=1"], "backbone"),
    ("bundled and external NATS at once", ["externalNats.url=nats://other:4222"], "not both"),
    ("a Secret name Kubernetes refuses", ["auth.existingSecret=Not_A_Name"], "existingSecret"),
    ("a metrics port the gateway already uses", ["metrics.port=8000"], "metrics"),
    ("an unknown top-level value", ["replicas=3"], "replicas"),
]

failures = []


def fail(what):
    failures.append(what)
    print(f"FAIL {what}")


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return p.returncode, p.stdout + p.stderr


def own_documents(out):
    """The YAML documents rendered from our own templates (not the subcharts'), but
    the dashboard's: its data is Grafana's JSON, whose long query lines are not ours
    to wrap (check_wiring compares it with dashboards/switchyard.json)."""
    docs = out.split("\n---\n")
    return [d for d in docs if "# Source: switchyard/templates/" in d
            and "# Source: switchyard/templates/dashboard.yaml" not in d]


def check_set(binary, name, files, api_versions, tmp):
    files = [os.path.join(CI, f) for f in files]
    for kube in KUBE_VERSIONS:
        code, docs, out, err = chart.render(files, (), kube, api_versions)
        if code != 0:
            fail(f"{name}: helm template --kube-version {kube}: {err.strip()}")
            return
        path = os.path.join(tmp, f"{name}-{kube}.yaml")
        builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
        with open(path, "w") as f:
            yaml.safe_dump_all(builtin, f)
        code, text = run(["kubernetes-validate", "--strict", "--quiet", "-k", kube, path])
        if code != 0:
            fail(f"{name}: kubernetes-validate -k {kube}:\n{text}")
    # yamllint: our templates' output only (the subcharts' output is theirs).
    own = os.path.join(tmp, f"{name}-own.yaml")
    with open(own, "w") as f:
        f.write("---\n" + "\n---\n".join(d.strip() for d in own_documents(out)) + "\n")
    lint_cfg = "{extends: default, rules: {line-length: {max: 160, allow-non-breakable-inline-mappings: true}, document-start: disable, indentation: {indent-sequences: whatever}, comments: {min-spaces-from-content: 1}}}"
    code, text = run(["yamllint", "-s", "-d", lint_cfg, own])
    if code != 0:
        fail(f"{name}: yamllint of our templates:\n{text}")
    # The ServiceMonitor against the CRD's schema; rendered only when the API exists.
    monitors = chart.find(docs, "ServiceMonitor")
    if MONITORING in api_versions:
        if len(monitors) != 1:
            fail(f"{name}: expected one ServiceMonitor, got {len(monitors)}")
        with open(CRD) as f:
            crd = yaml.safe_load(f)
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for m in monitors:
            try:
                jsonschema.validate(m, schema)
            except jsonschema.ValidationError as e:
                fail(f"{name}: ServiceMonitor does not match the CRD: {e.message}")
    elif monitors:
        fail(f"{name}: a ServiceMonitor was rendered without the CRD")
    # The check that matters most: what the pods get, fed to the real binary.
    deployments = [d["metadata"]["name"] for d in chart.find(docs, "Deployment")]
    for dep in deployments:
        if not dep.startswith(chart.RELEASE + "-switchyard"):
            continue
        root = os.path.join(tmp, name, dep)
        cfg, env = chart.materialize(docs, dep, root)
        child_env = {"PATH": os.environ.get("PATH", ""), **env}
        code, text = run([binary, "check-config"], env=child_env)
        if code != 0:
            fail(f"{name}: {dep}: switchyard check-config refused the chart's config:\n{text}\n--- {cfg}:\n{open(cfg).read()}")
        else:
            print(f"ok   {name}: {dep}: check-config: {text.strip()}")
    print(f"ok   {name}: rendered, validated for {', '.join(KUBE_VERSIONS)}, linted")
    return docs


def check_wiring(docs_by_set):
    """What each values set must wire, read from the rendered manifests."""
    d = docs_by_set["defaults"]
    toml = chart.config_toml(d)
    for want in ('kind = "nats"', 'url = "nats://sy-nats.switchyard.svc:4222"',
                 'url = "redis://sy-valkey.switchyard.svc:6379"', "stream_replicas = 3", 'hmac_secret = ""'):
        if want not in toml:
            fail(f"defaults: the config lacks {want!r}")
    if not chart.find(d, "StatefulSet", "sy-nats") or not chart.find(d, "Service", "sy-nats"):
        fail("defaults: no bundled NATS StatefulSet and Service sy-nats")
    if not chart.find(d, "Service", "sy-valkey"):
        fail("defaults: no bundled Valkey Service sy-valkey")
    nats_conf = chart.find(d, "ConfigMap", "sy-nats-config")[0]["data"]["nats.conf"]
    if '"jetstream"' not in nats_conf or "sy-nats-2" not in nats_conf:
        fail("defaults: the bundled NATS is not three clustered JetStream servers")
    feed = chart.find(d, "Deployment", "sy-switchyard-feed")
    if not feed or feed[0]["spec"]["replicas"] != 2:
        fail("defaults: no feed Deployment of 2 replicas")
    gw = chart.find(d, "Deployment", "sy-switchyard")[0]["spec"]["template"]["spec"]
    if gw["terminationGracePeriodSeconds"] != 20:
        fail(f"defaults: grace period {gw['terminationGracePeriodSeconds']}, want 5 + 10 + 5")
    c = gw["containers"][0]
    if c["securityContext"].get("readOnlyRootFilesystem") is not True or gw["securityContext"].get("runAsNonRoot") is not True:
        fail("defaults: the gateway is not non-root with a read-only root")
    if "replicas" in chart.find(d, "Deployment", "sy-switchyard")[0]["spec"]:
        fail("defaults: replicas set on a Deployment the HPA scales")
    nh = docs_by_set["no-hpa"]
    if chart.find(nh, "HorizontalPodAutoscaler") or chart.find(nh, "Deployment", "sy-switchyard-feed"):
        fail("no-hpa: an HPA or a feed was rendered")
    if chart.find(nh, "Deployment", "sy-switchyard")[0]["spec"].get("replicas") != 4:
        fail("no-hpa: replicas is not 4")
    if chart.find(nh, "Deployment", "sy-switchyard")[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] != 12:
        fail("no-hpa: a 1500ms drain should give 5 + 2 + 5 s of grace")
    ex = docs_by_set["external"]
    toml = chart.config_toml(ex)
    for want in ('url = "nats://nats-0.messaging:4222,', "stream_replicas = 3", 'credentials_file = "/etc/switchyard/nats/credentials"',
                 'request_timeout = "3s"', 'presence_ttl = "20s"', 'url = "redis://redis.data:6379/0"'):
        if want not in toml:
            fail(f"external: the config lacks {want!r}")
    if chart.find(ex, "StatefulSet") or chart.find(ex, "Secret"):
        fail("external: a bundled backbone or an own Secret was rendered")
    env = {e["name"]: e for e in chart.container(ex, "sy-switchyard")["env"]}
    if env["SWITCHYARD_REDIS__PASSWORD"]["valueFrom"]["secretKeyRef"] != {"name": "switchyard-redis", "key": "password"}:
        fail("external: the Redis password is not read from switchyard-redis/password")
    ei = docs_by_set["external-inline"]
    env = {e["name"]: e for e in chart.container(ei, "sy-switchyard")["env"]}
    own = "sy-switchyard-auth"
    for var, key in (("SWITCHYARD_NATS__USER", "nats-user"), ("SWITCHYARD_NATS__PASSWORD", "nats-password"),
                     ("SWITCHYARD_REDIS__PASSWORD", "redis-password")):
        if env.get(var, {}).get("valueFrom", {}).get("secretKeyRef") != {"name": own, "key": key}:
            fail(f"external-inline: {var} is not read from {own}/{key}")
    if "SWITCHYARD_AUTH__HMAC_SECRET" in env or "hmac-secret" in chart.find(ei, "Secret", own)[0]["data"]:
        fail("external-inline: an HMAC secret exists although only an RSA key was given")
    if 'rsa_public_key = "/etc/switchyard/keys/rsa-public-key"' not in chart.config_toml(ei):
        fail("external-inline: the RSA key file is not configured")
    sn = docs_by_set["single-node"]
    toml = chart.config_toml(sn)
    if 'kind = "memory"' not in toml or "embedded = true" not in toml or chart.find(sn, "Deployment", "sy-switchyard-feed"):
        fail("single-node: not the memory engine with the feed embedded")
    b = docs_by_set["bundled"]
    ing = chart.find(b, "Ingress")[0]["metadata"]["annotations"]
    if ing.get("nginx.ingress.kubernetes.io/proxy-read-timeout") != "3600":
        fail("bundled: the nginx Ingress has no WebSocket read timeout")
    if "stream_replicas = 1" not in chart.config_toml(b):
        fail("bundled: one NATS server should give streams of one replica")
    # /metrics: on its own port by default, scraped there, reachable there only.
    if 'listen = "0.0.0.0:9100"' not in chart.config_toml(d):
        fail("defaults: metrics.listen is not the metrics port")
    ports = {p["name"]: p for p in chart.find(d, "Service", "sy-switchyard")[0]["spec"]["ports"]}
    if ports.get("metrics", {}).get("port") != 9100:
        fail("defaults: the Service has no metrics port 9100")
    sm = docs_by_set["servicemonitor"]
    if chart.find(sm, "ServiceMonitor")[0]["spec"]["endpoints"][0]["port"] != "metrics":
        fail("servicemonitor: the ServiceMonitor does not scrape the metrics port")
    rules = chart.find(sm, "NetworkPolicy", "sy-switchyard")[0]["spec"]["ingress"]
    if [r["ports"][0]["port"] for r in rules] != ["http", "metrics"] or "from" not in rules[1]:
        fail("servicemonitor: the NetworkPolicy does not admit the scrapers to the metrics port only")
    dash = chart.find(sm, "ConfigMap", "sy-switchyard-dashboard")
    if not dash or dash[0]["metadata"]["labels"].get("grafana_dashboard") != "1":
        fail("servicemonitor: no dashboard ConfigMap with the sidecar's label")
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "helm", "switchyard", "dashboards", "switchyard.json")) as f:
        if json.loads(dash[0]["data"]["switchyard.json"]) != json.load(f):
            fail("servicemonitor: the dashboard ConfigMap is not dashboards/switchyard.json")
    print("ok   wiring: engine, URLs, replicas, feed, grace period, secrets, ingress, metrics port, dashboard")


def check_bad():
    for why, sets, needle in BAD:
        code, _, _, err = chart.render((), sets)
        if code == 0:
            fail(f"refused: {why} ({' '.join(sets)}) was accepted")
        elif needle not in err:
            fail(f"refused: {why}: the error does not name {needle!r}: {err.strip()}")
        else:
            print(f"ok   refused: {why}")


def main():
    binary = os.path.abspath(sys.argv[1])
    code, text = run([os.environ.get("HELM", "helm"), "lint", "--strict", chart.CHART])
    if code != 0:
        fail(f"helm lint --strict:\n{text}")
    for name, files, _ in SETS:
        code, text = run([os.environ.get("HELM", "helm"), "lint", "--strict", chart.CHART,
                          *sum((["-f", os.path.join(CI, f)] for f in files), [])])
        if code != 0:
            fail(f"helm lint --strict ({name}):\n{text}")
    print("ok   helm lint --strict, every values set")
    docs_by_set = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, files, api in SETS:
            docs = check_set(binary, name, files, api, tmp)
            if docs is not None:
                docs_by_set[name] = docs
    if len(docs_by_set) == len(SETS):
        check_wiring(docs_by_set)
    check_bad()
    if failures:
        print(f"helm-check: {len(failures)} failed")
        sys.exit(1)
    print(f"helm-check: passed ({len(SETS)} values sets, {len(BAD)} refused)")


if __name__ == "__main__":
    main()
