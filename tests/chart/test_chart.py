"""Lints and renders charts/flowgate offline (Helm's own code, via helm-python-sdk), validates
every rendered object against the Kubernetes schemas (kubernetes-validate) and checks what the
deployment must guarantee. Exits non-zero on any failure."""

import pathlib
import sys
import tomllib

import helm_python
import kubernetes_validate
import yaml

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts" / "flowgate"
KUBE_VERSION = "1.33.0"
failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def objects(values):
    chart = helm_python.Chart.load(str(CHART))
    manifests = chart.render(values, name="fg", namespace="gw", is_install=True)
    out = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def validate(objs, label):
    for obj in objs:
        kind = obj["kind"]
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD of the Prometheus Operator: no schema in kubernetes-validate. Checked by hand.
            print(f"skip {label}: {kind} is a CRD, not in the Kubernetes schemas")
            continue
        try:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            check(True, f"{label}: {kind} {obj['metadata']['name']} is valid for Kubernetes {KUBE_VERSION}")
        except Exception as e:  # ValidationError, or an unknown kind
            check(False, f"{label}: {kind} {obj['metadata']['name']}: {e}")


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


for strict_values in [None, {"serviceMonitor": {"enabled": True}, "autoscaling": {"enabled": True}}]:
    report = helm_python.lint(str(CHART), strict_values, strict=True, kube_version="v" + KUBE_VERSION)
    bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
    check(not bad, f"helm lint --strict ({'defaults' if strict_values is None else 'all options'}): {bad}")

# Defaults: one replica on SQLite.
default = objects(None)
validate(default, "defaults")
deploy = by_kind(default, "Deployment")[0]
pod = deploy["spec"]["template"]["spec"]
container = pod["containers"][0]
check(pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001,
      "the pod runs as a non-root user")
check(container["securityContext"]["readOnlyRootFilesystem"] is True, "the root filesystem is read-only")
check(container["securityContext"]["allowPrivilegeEscalation"] is False, "no privilege escalation")
check(container["securityContext"]["capabilities"]["drop"] == ["ALL"], "all capabilities dropped")
check(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe on /healthz")
check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe on /readyz")
mounts = {m["mountPath"] for m in container["volumeMounts"]}
check({"/etc/flowgate", "/var/lib/flowgate", "/tmp"} <= mounts, "config, data and /tmp are mounted")
check("checksum/config" in deploy["spec"]["template"]["metadata"]["annotations"], "a config change rolls the pods")
check(pod["terminationGracePeriodSeconds"] > 10, "termination grace exceeds the shutdown grace")
config = tomllib.loads(by_kind(default, "ConfigMap")[0]["data"]["flowgate.toml"])
check(config["server"]["listen"].startswith("0.0.0.0:"), "the config listens on every interface")
check(config["server"]["listen"].endswith(":8080") and container["ports"][0]["containerPort"] == 8080,
      "the container port is the config's")
check(not by_kind(default, "Secret"), "no Secret without a store URL or tokens")
check(not by_kind(default, "HorizontalPodAutoscaler") and not by_kind(default, "ServiceMonitor"),
      "HPA and ServiceMonitor are off by default")

# Every option on: PostgreSQL URL and admin tokens in the chart's Secret, HPA, ServiceMonitor.
url = "postgres://flowgate:s3cret@pg:5432/ledger"
full = objects({
    "store": {"url": url},
    "admin": {"tokens": ["t1", "t2"]},
    "serviceMonitor": {"enabled": True},
    "autoscaling": {"enabled": True},
})
validate(full, "all options")
secret = by_kind(full, "Secret")[0]
check(secret["stringData"]["FLOWGATE_STORE_URL"] == url, "the Secret carries the store URL")
check(secret["stringData"]["FLOWGATE_ADMIN_TOKENS"] == "t1,t2", "the Secret carries the admin tokens")
container = by_kind(full, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
check(container["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"], "the pod reads the Secret")
check("replicas" not in by_kind(full, "Deployment")[0]["spec"], "the HPA owns the replica count")
monitor = by_kind(full, "ServiceMonitor")[0]
check(monitor["spec"]["endpoints"][0]["path"] == "/metrics", "the ServiceMonitor scrapes /metrics")
check(url not in yaml.safe_dump(by_kind(full, "ConfigMap")), "the store URL is not in the ConfigMap")

# An existing Secret instead of the chart's.
existing = objects({"existingSecret": "flowgate-prod"})
validate(existing, "existingSecret")
container = by_kind(existing, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
check(container["envFrom"][0]["secretRef"]["name"] == "flowgate-prod", "an existing Secret is used")
check(not by_kind(existing, "Secret"), "no chart Secret beside an existing one")

print(f"\n{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
