#!/usr/bin/env python3
"""Prints every metric name the Grafana dashboard and the alert rules use, one per line, sorted.

    scripts/metric-names.py                      # dashboard + alerts, names the roles must export
    scripts/metric-names.py --source dashboard   # or: alerts
    scripts/metric-names.py --as-used            # histogram series as written (..._bucket)
    scripts/metric-names.py --with-synthetic     # also names Prometheus makes itself (up)

By default a histogram's series (`_bucket`, `_sum`, `_count`) are printed under the histogram's
own name, the one its `# TYPE` line in a scrape carries, and names Prometheus makes itself rather
than scrapes (`up`, `scrape_*`) are left out: what is printed is exactly what the three roles'
/metrics, taken together, must declare, so a test can compare the two sets and the dashboard and
alerts cannot drift from the code. Reads deploy/grafana/audience-export.json (panel targets and
template variable queries) and deploy/prometheus/alerts.yaml (every rule's `expr`); needs only
Python 3 (PyYAML if installed, else a reader for the rule file's own simple layout).
"""

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/audience-export.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yaml"

# Words of PromQL that look like identifiers but are not metric names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "atan2", "inf", "nan",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SYNTHETIC = re.compile(r"^(up|scrape_[a-z_]+)$")


def names_in(expr: str) -> set[str]:
    """Metric names in one PromQL expression (or a Grafana `label_values(metric, label)` query)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)           # strings (label values, $vars)
    text = re.sub(r"'(?:\\.|[^'\\])*'", "''", text)
    text = re.sub(r"\{[^}]*\}", " ", text)                     # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)                    # ranges and subqueries
    # Label lists after by/without/on/ignoring/group_*: names of labels, not of metrics.
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    # Grafana's label_values(metric, label): the second argument is a label.
    text = re.sub(r"\blabel_values\s*\(\s*([a-zA-Z_:][\w:]*)\s*,\s*\w+\s*\)", r" \1 ", text)
    found = set()
    for m in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS:
            continue
        found.add(word)
    return found


def dashboard_exprs(path: Path) -> list[str]:
    dash = json.loads(path.read_text())
    exprs = []

    def walk(panels):
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dash.get("panels", []))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var.get("query")
            exprs.append(query.get("query", "") if isinstance(query, dict) else query or "")
    return exprs


def alert_exprs(path: Path) -> list[str]:
    try:
        import yaml  # type: ignore
    except ImportError:
        yaml = None
    if yaml is not None:
        doc = yaml.safe_load(path.read_text())
        return [r["expr"] for g in doc["groups"] for r in g["rules"]]
    # Without PyYAML: `expr:` either holds the expression on its line or opens a `>-` block
    # whose more-indented lines follow.
    exprs, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, rest = len(m.group(1)), m.group(2).strip()
        if rest and not rest.startswith((">", "|")):
            exprs.append(rest.strip("'\""))
            continue
        block = []
        for follow in lines[i + 1:]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            block.append(follow.strip())
        exprs.append(" ".join(block))
    return exprs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=["all", "dashboard", "alerts"], default="all")
    parser.add_argument("--as-used", action="store_true",
                        help="print histogram series as written instead of the histogram's name")
    parser.add_argument("--with-synthetic", action="store_true",
                        help="include names Prometheus makes itself (up, scrape_*)")
    args = parser.parse_args()

    exprs = []
    if args.source in ("all", "dashboard"):
        exprs += dashboard_exprs(DASHBOARD)
    if args.source in ("all", "alerts"):
        exprs += alert_exprs(ALERTS)
    names = set()
    for expr in exprs:
        names |= names_in(expr)
    if not args.with_synthetic:
        names = {n for n in names if not SYNTHETIC.match(n)}
    if not args.as_used:
        names = {next((n[: -len(s)] for s in HISTOGRAM_SUFFIXES if n.endswith(s)), n) for n in names}
    if not names:
        print("no metric names found: is the dashboard or the rule file empty?", file=sys.stderr)
        return 1
    print("\n".join(sorted(names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
