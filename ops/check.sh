#!/usr/bin/env bash
# Static checks of ops/: Prometheus config, rules and their unit tests, Alertmanager config,
# the PromQL of every dashboard panel,
# the deploy Compose file, the Grafana dashboards, the runbook links of the alerts, and that
# every metric the dashboards and rules name is in ops/metrics.md.
#
#   ops/check.sh
#
# Installs promtool, amtool and docker-compose (Debian packages prometheus,
# prometheus-alertmanager, docker-compose) when they are missing, without starting their
# services. Needs no container engine and no running platform. (That every metric named in
# ops/ is really exported is checked against running roles by
# cloudphone/tests/cloudphone/ops.rs.)
set -euo pipefail

ops="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ops"

step() { printf '\n== %s\n' "$*"; }

# ------------------------------------------------------------------ tools
install_tools() {
    export DEBIAN_FRONTEND=noninteractive
    local packages=(prometheus prometheus-alertmanager docker-compose)
    # Debian starts a package's service on install; keep prometheus / alertmanager from
    # taking ports 9090 / 9093 and CPU here (policy-rc.d: 101 = action forbidden).
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod +x "$policy"
        created_policy=1
    fi
    if ! apt-get install -y --no-install-recommends "${packages[@]}"; then
        apt-get update
        apt-get install -y --no-install-recommends "${packages[@]}"
    fi
    if [ "$created_policy" = 1 ]; then
        rm -f "$policy"
    fi
    # In case a service started anyway (no policy-rc.d support): stop it, by its own pids.
    local service
    for service in prometheus prometheus-alertmanager; do
        service "$service" stop > /dev/null 2>&1 || true
        if command -v systemctl > /dev/null 2>&1; then
            systemctl disable "$service" > /dev/null 2>&1 || true
        fi
    done
    local daemon pids
    for daemon in prometheus prometheus-alertmanager; do
        pids="$(pidof "$daemon" 2> /dev/null || true)"
        if [ -n "$pids" ]; then
            # shellcheck disable=SC2086 # a list of pids
            kill $pids 2> /dev/null || true
        fi
    done
}

missing=0
for tool in promtool amtool docker-compose python3; do
    command -v "$tool" > /dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
    step "installing promtool, amtool, docker-compose"
    install_tools
fi

# ------------------------------------------------------------------ Prometheus
step "promtool check config prometheus/prometheus.yml"
# rule_files in prometheus.yml are relative to it; promtool resolves them the same way.
promtool check config prometheus/prometheus.yml

step "promtool check rules"
promtool check rules prometheus/*rules*.yml prometheus/alerts.yml

step "promtool test rules prometheus/tests/*.yml"
promtool test rules prometheus/tests/*.yml

# ------------------------------------------------------------------ Alertmanager
step "amtool check-config deploy/alertmanager.yml"
amtool check-config deploy/alertmanager.yml

# ------------------------------------------------------------------ Compose
step "docker-compose config -q (deploy/compose.yaml)"
# Secrets are files the operator makes; dummy ones let the file be checked anywhere.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for name in postgres_password db_password replication_password jwt_secret master_key grafana_admin_password; do
    printf 'dummy\n' > "$scratch/$name"
done
CLOUDPHONE_SECRETS_DIR="$scratch" docker-compose -f deploy/compose.yaml config -q
echo "compose.yaml is valid"

step "shell scripts parse"
for script in check.sh deploy/cloudphone-entrypoint.sh deploy/postgres/*.sh deploy/kafka/*.sh; do
    case "$(head -n1 "$script")" in
        *bash*) bash -n "$script" ;;
        *) sh -n "$script" ;;
    esac
    echo "ok $script"
done

# ------------------------------------------------------------------ Scrape targets
step "every port a role serves metrics on is a Prometheus scrape target"
# Debian's python3 has PyYAML (docker-compose, installed above, depends on python3-yaml).
/usr/bin/python3 - "$ops" <<'PY'
import os, re, sys
import yaml

ops = sys.argv[1]
compose = yaml.safe_load(open(os.path.join(ops, "deploy/compose.yaml")))
prometheus = yaml.safe_load(open(os.path.join(ops, "prometheus/prometheus.yml")))
targets = set()
for job in prometheus.get("scrape_configs", []):
    for sd in job.get("dns_sd_configs", []):
        for name in sd.get("names", []):
            targets.add((name, int(sd["port"])))
    for static in job.get("static_configs", []):
        for target in static.get("targets", []):
            host, _, port = target.rpartition(":")
            targets.add((host, int(port)))
# Every listener a role opens serves /metrics: the APIs' own, the projector's and relay's
# ops listener, the replay's.
listener = re.compile(r"^CLOUDPHONE_(\w+_)?LISTEN$")
missing, found = [], 0
for name, service in (compose.get("services") or {}).items():
    for key, value in (service.get("environment") or {}).items():
        if listener.match(key) and value:
            found += 1
            port = int(str(value).rpartition(":")[2])
            if (name, port) not in targets:
                missing.append(f"{name}:{port} ({key})")
if found == 0:
    sys.exit("no CLOUDPHONE_*_LISTEN in deploy/compose.yaml: the check reads nothing")
if missing:
    sys.exit("not scraped by prometheus/prometheus.yml: " + ", ".join(missing))
print(f"{found} listeners, each a scrape target")
PY

# ------------------------------------------------------------------ Grafana and cross-checks
step "Grafana dashboards, runbook links, metric reference"
for dashboard in grafana/dashboards/*.json; do
    python3 -m json.tool "$dashboard" > /dev/null
done
python3 - "$ops" <<'PY'
import glob, json, os, re, sys

ops = sys.argv[1]
problems = []

# Dashboards: unique uids, the provisioned datasource, an expression in every target.
uids = {}
for path in sorted(glob.glob(os.path.join(ops, "grafana/dashboards/*.json"))):
    name = os.path.relpath(path, ops)
    board = json.load(open(path))
    for key in ("uid", "title", "schemaVersion", "panels"):
        if key not in board:
            problems.append(f"{name}: no {key}")
    uid = board.get("uid")
    if uid in uids:
        problems.append(f"{name}: uid {uid} already used by {uids[uid]}")
    uids[uid] = name
    panels = [p for p in board.get("panels", []) if p.get("type") != "row"]
    if not panels:
        problems.append(f"{name}: no panel")
    for panel in panels:
        title = panel.get("title", "?")
        if panel.get("datasource", {}).get("uid") != "prometheus":
            problems.append(f"{name}: panel {title!r} does not use datasource uid prometheus")
        targets = panel.get("targets", [])
        if not targets or not all(t.get("expr", "").strip() for t in targets):
            problems.append(f"{name}: panel {title!r} has a target without expr")
    print(f"ok {name} (uid {uid}, {len(panels)} panels)")

# Alerts: every runbook_url names an existing page.
alerts = open(os.path.join(ops, "prometheus/alerts.yml")).read()
before = len(problems)
for url in sorted(set(re.findall(r"runbook_url:\s*(\S+)", alerts))):
    page = url.split("ops/", 1)[-1]
    if not os.path.isfile(os.path.join(ops, page)):
        problems.append(f"alerts.yml: runbook_url {url} names no file")
rules = len(re.findall(r"^\s*- alert:", alerts, re.M))
if rules != len(re.findall(r"runbook_url:", alerts)):
    problems.append("alerts.yml: an alert has no runbook_url")
if len(problems) == before:
    print(f"ok {rules} alerts, each with an existing runbook")

# Every metric named by rules and dashboards is documented in metrics.md.
def names(text):
    found = set()
    for m in re.finditer(r"(?<![A-Za-z0-9_:])(cloudphone_[a-z0-9_]+|process_[a-z0-9_]+)(?![a-z0-9_:])", text):
        found.add(re.sub(r"_(bucket|sum|count)$", "", m.group(1)))
    return found

before = len(problems)
reference = open(os.path.join(ops, "metrics.md")).read()
documented = set(re.findall(r"^\|\s*`([a-z0-9_]+)`", reference, re.M))
files = glob.glob(os.path.join(ops, "prometheus/*.yml")) + glob.glob(os.path.join(ops, "grafana/dashboards/*.json"))
for path in sorted(files):
    for name in sorted(names(open(path).read()) - documented):
        problems.append(f"{os.path.relpath(path, ops)}: {name} is not in metrics.md")
undocumented = names(reference) - documented
for name in sorted(undocumented):
    problems.append(f"metrics.md names {name} outside its table")
if len(problems) == before:
    print(f"ok every metric of the rules and dashboards is in metrics.md ({len(documented)} metrics)")

if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
PY

step "promtool: every dashboard expression is valid PromQL"
# The panels' expressions as recording rules (JSON is YAML), so promtool parses each one.
python3 - "$ops" "$scratch/dashboards.rules.json" <<'PY'
import glob, json, os, sys

ops, out = sys.argv[1], sys.argv[2]
rules = []
for path in sorted(glob.glob(os.path.join(ops, "grafana/dashboards/*.json"))):
    for panel in json.load(open(path)).get("panels", []):
        for target in panel.get("targets", []):
            rules.append({"record": f"dashboard:expr{len(rules)}:check", "expr": target["expr"]})
json.dump({"groups": [{"name": "dashboards", "rules": rules}]}, open(out, "w"))
PY
promtool check rules "$scratch/dashboards.rules.json"

step "all ops checks passed"
