#!/usr/bin/env bash
# `just deploy-checks` (part of `just test`): checks deploy/ and helm/ offline, with the tools
# scripts/tools.sh installs (helm, kubernetes-validate, hadolint and the CRD models in .tools/;
# promtool from Debian):
#   - hadolint on deploy/Dockerfile
#   - the chart's copies of the alert rules and the dashboard equal deploy/'s
#   - helm lint --strict, with the default values and ci/production-values.yaml
#   - helm template (default values, production values, every switch on) validated by
#     kubernetes-validate --strict against Kubernetes 1.30's schemas, and the custom resources
#     (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication) against their CRDs
#   - each role reads only its own secrets, from the Secret (the finalizer never the encryption keys)
#   - a misspelt value fails (values.schema.json)
#   - promtool check rules, test rules and check config (deploy/prometheus/)
#   - every alert has a summary, a description, a runbook section in README.md that its
#     runbook_url points at, and a unit test where it fires
#   - the PrometheusRule the chart renders holds exactly the rules of deploy/prometheus/alerts.yaml
#   - the dashboard is JSON, every panel queries ${datasource}, the ConfigMap carries it unchanged
# `scripts/deploy-checks.sh --sync` copies deploy/'s rules and dashboard into the chart first.
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=helm/audience-export
PROD="$CHART/ci/production-values.yaml"
K8S_VERSION=1.30.0
export PATH="$PWD/.tools/bin:$PATH"
PY="$PWD/.tools/venv/bin/python"

if [ "${1:-}" = --sync ]; then
  cp deploy/prometheus/alerts.yaml "$CHART/files/alerts.yaml"
  cp deploy/grafana/audience-export.json "$CHART/files/audience-export.json"
  echo "Copied deploy/prometheus/alerts.yaml and deploy/grafana/audience-export.json into $CHART/files/."
fi

for tool in helm kubernetes-validate hadolint promtool; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is missing: run scripts/tools.sh (just tools)" >&2; exit 1; }
done
[ -x "$PY" ] || { echo ".tools/venv is missing: run scripts/tools.sh (just tools)" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
check() { printf '\n== %s\n' "$*"; }
ok() { passed=$((passed + 1)); }
fail() { echo "FAILED: $*" >&2; echo "deploy checks: $passed passed, 1 failed" >&2; exit 1; }

check "hadolint deploy/Dockerfile"
hadolint deploy/Dockerfile || fail "hadolint"
echo "clean"; ok

check "the chart's copies of the rules and the dashboard"
for src in deploy/prometheus/alerts.yaml deploy/grafana/audience-export.json; do
  copy="$CHART/files/$(basename "$src")"
  cmp -s "$src" "$copy" || fail "$copy differs from $src: edit $src, then run scripts/deploy-checks.sh --sync"
  echo "$copy = $src"
done
ok

check "helm lint --strict (default values, production values)"
helm lint --strict "$CHART" || fail "helm lint (default values)"
helm lint --strict "$CHART" -f "$PROD" || fail "helm lint ($PROD)"
ok

check "helm template: default values, production values, every switch on"
helm template ae "$CHART" -n exports >"$work/default.yaml" || fail "helm template (default values)"
helm template ae "$CHART" -n exports -f "$PROD" >"$work/production.yaml" || fail "helm template ($PROD)"
# What neither of the two turns on: the dev Secret, the HPA with the source volume and the
# dashboard in the release's namespace, a digest-pinned image.
helm template ae "$CHART" -n exports \
  --set secrets.create=true,secrets.dev.apiKey=k,secrets.dev.encryptionKeys=dev:a2V5,secrets.dev.appSecret=s \
  --set secrets.dev.amqpUrl=amqp://u:p@rabbitmq:5672/%2f,secrets.dev.redisUrl=redis://redis:6379/ \
  --set producer.sourceVolume.enabled=true,producer.sourceVolume.claimName=segments \
  --set producer.sourceSecrets.enabled=true,producer.sourceSecrets.secretName=segment-store \
  --set networkPolicy.enabled=true,metrics.serviceMonitor.enabled=true,metrics.prometheusRule.enabled=true \
  --set metrics.dashboard.enabled=true,image.digest=sha256:0000000000000000000000000000000000000000000000000000000000000000 \
  >"$work/all-on.yaml" || fail "helm template (every switch on)"
for f in default production all-on; do
  printf '%-11s %s\n' "$f:" "$(grep -E '^kind: ' "$work/$f.yaml" | sort | uniq -c | awk '{printf "%s %s, ", $1, $3}' | sed 's/, $//')"
done
ok

check "kubernetes-validate --strict --kubernetes-version $K8S_VERSION"
# First, that strict validation refuses an unknown field on this install (else it proves nothing).
cat >"$work/typo.yaml" <<'EOF'
apiVersion: v1
kind: Service
metadata: {name: typo}
spec: {ports: [{port: 80}], selectr: {app: x}}
EOF
if kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$work/typo.yaml" >/dev/null 2>&1; then
  fail "kubernetes-validate --strict accepted an unknown field"
fi
skipped=""
for f in default production all-on; do
  out="$(kubernetes-validate --strict -k "$K8S_VERSION" "$work/$f.yaml" 2>&1)" || { echo "$out"; fail "kubernetes-validate ($f)"; }
  echo "$f: $(grep -c '^INFO .* passed' <<<"$out") objects passed"
  skipped+="$(grep -o "Couldn't find schema for kind [A-Za-z]* with api version [^ ]*" <<<"$out" | awk '{print $6" ("$10")"}' || true)"$'\n'
done
skipped="$(sort -u <<<"$skipped" | sed '/^$/d' | paste -sd, - | sed 's/,/, /g')"
[ -n "$skipped" ] && echo "not Kubernetes' own kinds, checked in the next step: $skipped"
ok

check "custom resources against their CRDs (cloudcoil models of KEDA and prometheus-operator)"
"$PY" scripts/validate-crds.py "$work/production.yaml" "$work/all-on.yaml" || fail "custom resources"
ok

check "each role gets only its secrets, from the Secret, never as values"
"$PY" - "$work/default.yaml" "$work/production.yaml" "$work/all-on.yaml" <<'PY' || fail "secrets reach the wrong roles"
import sys, yaml
allowed = {  # Secret key -> roles that read it (README.md, "Installing the chart")
    "api-key": {"producer"}, "encryption-keys": {"producer", "worker"}, "app-secret": {"producer", "worker"},
    "amqp-url": {"producer", "worker", "finalizer"}, "redis-url": {"producer", "worker", "finalizer"},
}
secret_vars = {"AE_API__KEY", "AE_CONNECTIONS__ENCRYPTION_KEYS", "AE_GRAPH__APP_SECRET", "AE_AMQP_URL", "AE_REDIS_URL"}
problems = []
for path in sys.argv[1:]:
    for d in yaml.safe_load_all(open(path)):
        if not d or d["kind"] != "Deployment":
            continue
        role = d["metadata"]["labels"]["app.kubernetes.io/component"]
        for c in d["spec"]["template"]["spec"]["containers"]:
            keys = set()
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    keys.add(ref["key"])
                elif e["name"] in secret_vars:
                    problems.append(f"{path}: {role} gets {e['name']} as a value")
            for key in keys:
                if role not in allowed.get(key, set()):
                    problems.append(f"{path}: {role} reads {key}")
            for key, roles in allowed.items():
                if role in roles and key not in keys:
                    problems.append(f"{path}: {role} misses {key}")
print("\n".join(problems) if problems else "producer: all five keys; worker: all but api-key; finalizer: amqp-url and redis-url only")
raise SystemExit(1 if problems else 0)
PY
ok

check "a misspelt value fails values.schema.json"
for typo in "worker.replcas=3" "config.worker.concurency=4" "metrics.serviceMonitor.enable=true" "secrets.existingSecrets=x"; do
  if helm template ae "$CHART" --set "$typo" >"$work/typo.out" 2>&1; then
    fail "helm template accepted --set $typo"
  fi
  grep -q "Additional property" "$work/typo.out" || { cat "$work/typo.out"; fail "--set $typo failed for another reason"; }
  echo "refused: --set $typo"
done
ok

check "promtool check rules, test rules, check config"
promtool check rules deploy/prometheus/alerts.yaml || fail "promtool check rules"
promtool test rules deploy/prometheus/alerts.test.yaml || fail "promtool test rules"
promtool check config deploy/prometheus/prometheus.yml || fail "promtool check config"
ok

check "every alert has a runbook section in README.md and a firing unit test"
"$PY" - <<'PY' || fail "alerts, runbooks and tests out of step"
import re, yaml
rules = [r for g in yaml.safe_load(open("deploy/prometheus/alerts.yaml"))["groups"] for r in g["rules"]]
readme = open("README.md").read()
runbook = readme.split("### Alerts runbook", 1)[1].split("\n## ", 1)[0] if "### Alerts runbook" in readme else ""
sections = re.findall(r"^#### (\S+)\s*$", runbook, re.M)
tests = yaml.safe_load(open("deploy/prometheus/alerts.test.yaml"))["tests"]
fired = {t["alertname"] for g in tests for t in g["alert_rule_test"] if t.get("exp_alerts")}
problems = []
for r in rules:
    name, url = r["alert"], r["annotations"].get("runbook_url", "")
    for key in ("summary", "description", "runbook_url"):
        if not r["annotations"].get(key):
            problems.append(f"{name}: no {key}")
    if not url.endswith("#" + name.lower()):
        problems.append(f"{name}: runbook_url {url} is not README.md#{name.lower()}")
    if name not in sections:
        problems.append(f"{name}: no '#### {name}' under '### Alerts runbook' in README.md")
    if name not in fired:
        problems.append(f"{name}: no test in alerts.test.yaml where it fires")
for extra in sorted(set(sections) - {r["alert"] for r in rules}):
    problems.append(f"README.md runbook '{extra}' names no alert")
print("\n".join(problems) if problems else f"{len(rules)} alerts: each with summary, description, a README.md runbook section and a firing test")
raise SystemExit(1 if problems else 0)
PY
ok

check "the chart's PrometheusRule holds the rules of deploy/prometheus/alerts.yaml"
base="$(helm show values "$CHART" | awk '/runbookBaseUrl:/ {print $2}')"
prod_base="$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["metrics"]["prometheusRule"]["runbookBaseUrl"])' "$PROD")"
"$PY" - "$work/all-on.yaml" "$work/production.yaml" "$base" "$prod_base" <<'PY' || fail "PrometheusRule differs from deploy/prometheus/alerts.yaml"
import json, sys, yaml
want = yaml.safe_load(open("deploy/prometheus/alerts.yaml"))
for path, base in ((sys.argv[1], sys.argv[3]), (sys.argv[2], sys.argv[4])):
    rules = [d for d in yaml.safe_load_all(open(path)) if d and d.get("kind") == "PrometheusRule"]
    assert len(rules) == 1, f"{path}: {len(rules)} PrometheusRules"
    # The chart points runbook_url at its own base; put the file's back before comparing.
    got = json.loads(json.dumps(rules[0]["spec"]).replace(base, "https://example.com/audience-export/README.md"))
    if got != want:
        print(f"{path}: the rendered rules differ from deploy/prometheus/alerts.yaml")
        sys.exit(1)
    names = [r["alert"] for g in got["groups"] for r in g["rules"]]
    print(f"{path.rsplit('/', 1)[-1]}: {len(names)} rules, the same as the file (runbooks at {base})")
PY
ok

check "the Grafana dashboard"
python3 -m json.tool deploy/grafana/audience-export.json >/dev/null || fail "deploy/grafana/audience-export.json is not JSON"
"$PY" - "$work/all-on.yaml" <<'PY' || fail "dashboard"
import json, sys, yaml
dash = json.load(open("deploy/grafana/audience-export.json"))
panels = [p for p in dash["panels"] if p["type"] != "row"]
wrong = [p["title"] for p in panels
         if p.get("datasource", {}).get("uid") != "${datasource}"
         or any(t.get("datasource", {}).get("uid") != "${datasource}" for t in p.get("targets", []))]
assert not wrong, f"panels not on ${{datasource}}: {wrong}"
assert any(v["name"] == "datasource" and v["type"] == "datasource" for v in dash["templating"]["list"])
maps = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "ConfigMap"
        and "audience-export.json" in d.get("data", {})]
assert len(maps) == 1 and json.loads(maps[0]["data"]["audience-export.json"]) == dash, "the ConfigMap's dashboard differs"
print(f"JSON; {len(panels)} panels, every one on ${{datasource}}; the ConfigMap carries it unchanged")
PY
names="$(python3 scripts/metric-names.py)" || fail "scripts/metric-names.py"
echo "metric names used by the dashboard and the alerts (scripts/metric-names.py): $(wc -l <<<"$names")"
ok

echo
echo "deploy checks: $passed passed, 0 failed"
