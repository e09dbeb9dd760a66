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


def fails(values, needle, what):
    """The chart must refuse to render `values`, saying `needle`."""
    try:
        objects(values)
    except Exception as e:  # Helm's template error, with the chart's `fail` message
        check(needle in str(e), f"refused: {what} ({needle!r} in the error)")
        return
    check(False, f"refused: {what} (it rendered)")


PG = {"store": {"kind": "postgres", "url": "postgres://flowgate:s3cret@pg:5432/ledger"}}

for strict_values in [None, {**PG, "serviceMonitor": {"enabled": True}, "autoscaling": {"enabled": True}}]:
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
# The SQLite ledger outlives the pod and the release; one pod at a time opens it.
claims = by_kind(default, "PersistentVolumeClaim")
check(len(claims) == 1, "the SQLite ledger gets a PersistentVolumeClaim by default")
check(claims[0]["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep",
      "the ledger's claim survives helm uninstall")
data = [v for v in pod["volumes"] if v["name"] == "data"][0]
check(data.get("persistentVolumeClaim", {}).get("claimName") == claims[0]["metadata"]["name"],
      "the pod's data volume is the claim, not an emptyDir")
check(deploy["spec"]["strategy"]["type"] == "Recreate", "never two pods on one SQLite file (Recreate)")
env = {e["name"]: e.get("value") for e in container["env"]}
check(env.get("FLOWGATE_STORE_URL") == "sqlite:///var/lib/flowgate/flowgate.db",
      "the ledger path is on the claim's mount")
check(container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0, "a preStop delay before SIGTERM")
check(not by_kind(default, "PodDisruptionBudget"), "no PDB for a single SQLite pod (it would block drains)")
check(not by_kind(default, "CronJob"), "no backup CronJob unless asked")
check(not by_kind(default, "HorizontalPodAutoscaler") and not by_kind(default, "ServiceMonitor"),
      "HPA and ServiceMonitor are off by default")

# Every option on: PostgreSQL URL and admin tokens in the chart's Secret, HPA, ServiceMonitor.
url = PG["store"]["url"]
full = objects({
    "store": {"kind": "postgres", "url": url},
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
pg_pod = by_kind(full, "Deployment")[0]["spec"]["template"]["spec"]
init = pg_pod.get("initContainers", [])
check(len(init) == 1 and init[0]["args"][0] == "migrate", "PostgreSQL: migrations in an init container")
check(init and init[0]["envFrom"][0]["secretRef"]["name"] == secret["metadata"]["name"],
      "the migration reads the URL from the Secret")
check(by_kind(full, "Deployment")[0]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0,
      "PostgreSQL: rolling updates keep every pod until its successor is ready")
check(not by_kind(full, "PersistentVolumeClaim"), "PostgreSQL: no ledger claim")
pdb = by_kind(full, "PodDisruptionBudget")
check(len(pdb) == 1 and pdb[0]["spec"]["minAvailable"] == 1, "PostgreSQL: a PodDisruptionBudget")

# Scheduled SQLite backups.
backup = objects({"backup": {"enabled": True, "claim": "ledger-backups"}})
validate(backup, "backup")
job = by_kind(backup, "CronJob")[0]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
check("flowgate backup" in job["containers"][0]["args"][0], "the CronJob runs flowgate backup")
claims_used = {v["persistentVolumeClaim"]["claimName"] for v in job["volumes"] if "persistentVolumeClaim" in v}
check(claims_used == {"fg-flowgate-ledger", "ledger-backups"}, f"it mounts the ledger and the backup claims: {claims_used}")
check(job["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"]
      == "kubernetes.io/hostname", "it runs on the flowgate pod's node (ReadWriteOnce)")

# Values that would lose or split the ledger do not render.
fails({"replicaCount": 2}, "replicaCount > 1 with store.kind=sqlite", "two replicas on SQLite")
fails({"autoscaling": {"enabled": True}}, "autoscaling.enabled with store.kind=sqlite", "an autoscaler on SQLite")
fails({"store": {"kind": "postgres"}}, "store.kind=postgres needs its URL", "PostgreSQL without a URL")
fails({"store": {"kind": "none"}}, "store.kind must be", "no store at all")
fails({"store": {"sqlite": {"persistence": {"enabled": False}}}}, "lost with the pod", "SQLite without persistence")
fails({**PG, "backup": {"enabled": True, "claim": "x"}}, "backup.enabled is for SQLite", "the SQLite backup on PostgreSQL")
demo = objects({"store": {"sqlite": {"persistence": {"enabled": False, "acceptLedgerLoss": True}}}})
check("emptyDir" in [v for v in by_kind(demo, "Deployment")[0]["spec"]["template"]["spec"]["volumes"]
                     if v["name"] == "data"][0], "a demo may accept an emptyDir ledger, explicitly")

# An existing Secret instead of the chart's.
existing = objects({"store": {"kind": "postgres"}, "existingSecret": "flowgate-prod"})
validate(existing, "existingSecret")
container = by_kind(existing, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
check(container["envFrom"][0]["secretRef"]["name"] == "flowgate-prod", "an existing Secret is used")
check(not by_kind(existing, "Secret"), "no chart Secret beside an existing one")

print(f"\n{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
