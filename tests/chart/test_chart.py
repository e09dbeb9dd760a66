"""Lints and renders charts/flowgate offline (Helm's own code, via helm-python-sdk), validates
every rendered object against the Kubernetes schemas (kubernetes-validate) and checks what the
deployment must guarantee, and that the Grafana dashboard queries only metrics flowgate exports
(src/metrics.rs). Exits non-zero on any failure."""

import json
import pathlib
import re
import sys
import tomllib

import helm_python
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "flowgate"
DASHBOARD = CHART / "dashboards" / "flowgate.json"
METRICS_RS = ROOT / "src" / "metrics.rs"
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

for strict_values in [None, {**PG, "serviceMonitor": {"enabled": True}, "autoscaling": {"enabled": True},
                             "dashboard": {"enabled": True}}]:
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
check(not [c for c in by_kind(default, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")],
      "no dashboard ConfigMap by default")

# Every option on: PostgreSQL URL and admin tokens in the chart's Secret, HPA, ServiceMonitor.
url = PG["store"]["url"]
full = objects({
    "store": {"kind": "postgres", "url": url},
    "admin": {"tokens": ["t1", "t2"]},
    "usagePage": {"sessionSecret": "s" * 40},
    "serviceMonitor": {"enabled": True},
    "autoscaling": {"enabled": True},
    "dashboard": {"enabled": True},
})
validate(full, "all options")
secret = by_kind(full, "Secret")[0]
check(secret["stringData"]["FLOWGATE_STORE_URL"] == url, "the Secret carries the store URL")
check(secret["stringData"]["FLOWGATE_ADMIN_TOKENS"] == "t1,t2", "the Secret carries the admin tokens")
check(secret["stringData"]["FLOWGATE_USAGE_PAGE_SECRET"] == "s" * 40,
      "the Secret carries the usage page's session secret")
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

# The Grafana dashboard. Every series it queries must be one flowgate exports: the names are read
# from src/metrics.rs, with a histogram's series (_bucket, _sum, _count) in place of its name.
rust = METRICS_RS.read_text()
defined = {}  # name -> counter | gauge | histogram
for constructor, name in re.findall(r'([A-Za-z_][A-Za-z0-9_:]*)\(\s*"(flowgate_[a-z0-9_]+)"', rust):
    kind = next((k for k in ("histogram", "gauge", "counter") if k in constructor.lower()), constructor)
    defined[name] = kind
literals = set(re.findall(r'"(flowgate_[a-z0-9_]+)"', rust))
check(literals and literals == set(defined) and set(defined.values()) <= {"counter", "gauge", "histogram"},
      f"src/metrics.rs: {len(defined)} metrics, each of a known kind: {sorted(defined.items())}")
series = {}  # a series name Prometheus will hold -> the metric it belongs to
for name, kind in defined.items():
    for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",)):
        series[name + suffix] = name


def unknown_series(expr):
    """What `expr` queries that src/metrics.rs does not export, each with the reason."""
    out = []
    for ident in re.findall(r"flowgate_[a-z0-9_]+", expr):
        if ident in series:
            continue
        if defined.get(ident) == "histogram":
            out.append(f"{ident} (a histogram: query its _bucket, _sum or _count)")
        else:
            out.append(f"{ident} (not in src/metrics.rs)")
    return out


try:
    dashboard = json.loads(DASHBOARD.read_text())
    check(True, f"{DASHBOARD.relative_to(ROOT)} is valid JSON")
except ValueError as e:
    check(False, f"{DASHBOARD.relative_to(ROOT)} is not valid JSON: {e}")
    dashboard = {}
check(dashboard.get("schemaVersion", 0) >= 36, f"the dashboard's schemaVersion: {dashboard.get('schemaVersion')}")
variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
ds_var = variables.get("datasource", {})
check(ds_var.get("type") == "datasource" and ds_var.get("query") == "prometheus",
      "the dashboard has a Prometheus data source variable, `datasource`")
DATASOURCE_REFS = {"${datasource}", "$datasource"}
filters = [n for n, v in variables.items() if v.get("type") == "query"]
check(filters, f"the dashboard has filter variables: {filters}")
for name in filters:
    v = variables[name]
    check(v.get("datasource", {}).get("uid") in DATASOURCE_REFS, f"variable {name} queries the `datasource` variable")
    query = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
    bad = unknown_series(query)
    check(query and not bad, f"variable {name} queries metrics flowgate exports: {bad}")

panels = []
for p in dashboard.get("panels", []):
    panels.append(p)
    panels.extend(p.get("panels", []))  # a collapsed row holds its panels
check(panels, f"the dashboard has panels ({len(panels)})")
ids = [p.get("id") for p in panels]
dupes = sorted({i for i in ids if ids.count(i) > 1}, key=str)
check(None not in ids and not dupes, f"every panel has an id, no two alike: duplicates {dupes}")
used = set()
for p in panels:
    title = p.get("title", "")
    what = f"dashboard panel {title or '(untitled)'!r} (id {p.get('id')})"
    if not title:
        check(False, f"{what} has no title")
    if p.get("type") == "row":
        check(title and not p.get("targets"), f"{what}: a row, titled, with no queries of its own")
        continue
    targets = p.get("targets", [])
    problems = []
    if (p.get("datasource") or {}).get("uid") not in DATASOURCE_REFS:
        problems.append(f"datasource {p.get('datasource')} is not the `datasource` variable")
    if not targets:
        problems.append("no targets")
    for t in targets:
        expr = (t.get("expr") or "").strip()
        if not expr:
            problems.append(f"target {t.get('refId')} has no expr")
            continue
        if "datasource" in t and t["datasource"].get("uid") not in DATASOURCE_REFS:
            problems.append(f"target {t.get('refId')} has its own datasource {t['datasource']}")
        problems += [f"queries {u}" for u in unknown_series(expr)]
        for var in re.findall(r"\$\{?(\w+)", expr):
            if var not in variables and not var.startswith("__"):
                problems.append(f"uses ${var}, not a dashboard variable")
        # Every selector follows the dashboard's filters.
        for metric, selector in re.findall(r"(flowgate_[a-z0-9_]+)(\{[^}]*\})?", expr):
            used.add(series.get(metric, metric))
            missing = [n for n in filters if f'{n}=~"${n}"' not in selector]
            if missing:
                problems.append(f"{metric} is not filtered by {missing}")
    check(not problems, f"{what}: {'; '.join(problems) or 'titled, on the datasource variable, its queries known'}")
unshown = sorted(set(defined) - used)
print(f"info the dashboard shows {len(used)} of {len(defined)} metrics" + (f"; not shown: {unshown}" if unshown else ""))

# The dashboard's ConfigMap, for the Grafana sidecar: only when asked.
def dashboard_map(objs):
    return [c for c in by_kind(objs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


grafana = objects({"dashboard": {"enabled": True}})
validate(grafana, "dashboard")
maps = dashboard_map(grafana)
check(len(maps) == 1, "dashboard.enabled: a dashboard ConfigMap")
if maps:
    cm = maps[0]
    check(cm["metadata"]["labels"].get("grafana_dashboard") == "1",
          "it carries the Grafana sidecar's label, grafana_dashboard: \"1\"")
    check("namespace" not in cm["metadata"], "it is in the release's namespace by default")
    try:
        check(json.loads(cm["data"]["flowgate.json"]) == dashboard,
              "its flowgate.json is valid JSON, the dashboard file itself")
    except (KeyError, ValueError) as e:
        check(False, f"its flowgate.json is not valid JSON: {e!r}")
custom = dashboard_map(objects({"dashboard": {
    "enabled": True, "label": "grafana.io/dashboard", "labelValue": 1, "labels": {"team": "gateway"},
    "annotations": {"grafana_folder": "flowgate"}, "namespace": "monitoring"}}))
meta = custom[0]["metadata"] if custom else {}
check(meta.get("labels", {}).get("grafana.io/dashboard") == "1" and "grafana_dashboard" not in meta.get("labels", {})
      and meta.get("labels", {}).get("team") == "gateway",
      "the sidecar's label and value are configurable, with extra labels")
check(meta.get("namespace") == "monitoring" and meta.get("annotations", {}).get("grafana_folder") == "flowgate",
      "the dashboard's namespace and annotations are configurable")

print(f"\n{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
