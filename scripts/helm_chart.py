#!/usr/bin/env python3
"""Lint and render a Helm chart offline with Helm's own SDK (PyPI
helm-python-sdk), for the chart tests (membrane/tests/helm_chart.rs).

    helm_chart.py CHART_DIR [VALUES_JSON] [NAMESPACE]

Prints one JSON object: {"lint": <helm lint report>, "manifests":
{template path: rendered text}, "crds": [{"name", "data"}]}. Exits 2 when
helm-python-sdk is missing and 1 when the chart does not load or render.
"""

import json
import sys


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        import helm_python as helm
    except ImportError as e:
        print(f"helm-python-sdk is not installed (scripts/setup.sh): {e}", file=sys.stderr)
        return 2
    chart_dir = sys.argv[1]
    values = json.loads(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] else {}
    namespace = sys.argv[3] if len(sys.argv) > 3 else "kube-system"
    try:
        report = helm.lint(chart_dir, values, strict=True, namespace=namespace)
        chart = helm.Chart.load(chart_dir)
        manifests = chart.render(values, name="membrane", namespace=namespace, is_install=True)
        crds = [{"name": c["name"], "data": c["data"]} for c in chart.crds]
    except helm.HelmError as e:
        print(f"helm: {e}", file=sys.stderr)
        return 1
    json.dump({"lint": report, "manifests": manifests, "crds": crds}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
