#!/usr/bin/env python3
"""The imds-guard Grafana dashboard, built with grafana-foundation-sdk.

    python3 deploy/monitoring/dashboards/generate.py > deploy/monitoring/dashboards/imds-guard.json

tests/tests/monitoring_bundle.rs runs this and fails when the committed JSON
differs, so edit the dashboard here, not in the JSON. Every query's metric
names are checked against a running daemon's /metrics by
tests/tests/monitoring.rs.
"""

import json
import sys

from grafana_foundation_sdk.builders import (
    common as common_builders,
    dashboard,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.prometheus import PromQueryFormat
from grafana_foundation_sdk.models.dashboard import (
    Dashboard,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
    VariableRefresh,
    VariableSort,
)

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# Every query is limited to the nodes picked in the node variable.
NODES = 'node=~"${node}"'


def query(expr: str, legend: str, ref_id: str = "A") -> prometheus.Dataquery:
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(DATASOURCE)
    )


def series(title: str, description: str, unit: str, *queries: prometheus.Dataquery) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .height(8)
        .span(12)
        .legend(
            common_builders.VizLegendOptions()
            .show_legend(True)
            .display_mode(common.LegendDisplayMode.TABLE)
            .placement(common.LegendPlacement.RIGHT)
            .calcs(["lastNotNull", "max"])
        )
    )
    for target in queries:
        panel = panel.with_target(target)
    return panel


def per_node_stat(title: str, description: str, expr: str, below_one: str, from_one: str) -> stat.Panel:
    """A value per node, coloured below_one under 1 and from_one at 1 or more."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .with_target(query(expr, "{{node}}"))
        .graph_mode(common.BigValueGraphMode.NONE)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(dashboard.ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE).steps([Threshold(value=None, color=below_one), Threshold(value=1, color=from_one)]))
        .no_value("no daemon")
        .height(5)
        .span(8)
    )


def latency(title: str, histogram: str) -> timeseries.Panel:
    by_node = f"sum by (node, le) (rate({histogram}_bucket{{{NODES}}}[$__rate_interval]))"
    return series(
        title,
        f"Median and 99th percentile of {histogram}, per node.",
        "s",
        query(f"histogram_quantile(0.5, {by_node})", "p50 {{node}}", "A"),
        query(f"histogram_quantile(0.99, {by_node})", "p99 {{node}}", "B"),
    )


def build() -> Dashboard:
    built = (
        dashboard.Dashboard("imds-guard")
        .uid("imds-guard")
        .description("Who is refused the cloud metadata API, and whether imds-guard enforces on every node.")
        .tags(["imds-guard"])
        .time("now-6h", "now")
        .refresh("1m")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(
            dashboard.QueryVariable("node")
            .label("Node")
            .datasource(DATASOURCE)
            .query("label_values(imds_guard_programs_expected, node)")
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True)
            .include_all(True)
            .all_value(".*")
        )
        .with_row(dashboard.Row("Enforcement"))
        .with_panel(
            per_node_stat(
                "Programs missing",
                "eBPF programs not attached per node (imds_guard_programs_expected - imds_guard_programs_attached). "
                "Any: traffic is not refused at the socket there.",
                f"imds_guard_programs_expected{{{NODES}}} - imds_guard_programs_attached{{{NODES}}}",
                below_one="green",
                from_one="red",
            )
        )
        .with_panel(
            per_node_stat(
                "Ready",
                "1 when the daemon is ready as /readyz judges it.",
                f"imds_guard_ready{{{NODES}}}",
                below_one="red",
                from_one="green",
            )
        )
        .with_panel(
            per_node_stat(
                "API server reachable",
                "1 when the daemon's last watch request succeeded.",
                f"imds_guard_api_reachable{{{NODES}}}",
                below_one="red",
                from_one="green",
            )
        )
        .with_panel(
            series(
                "Programs attached per node",
                "Attached (lines) against the number a fully enforced node has.",
                "short",
                query(f"imds_guard_programs_attached{{{NODES}}}", "{{node}}", "A"),
                query(f"max(imds_guard_programs_expected{{{NODES}}})", "expected", "B"),
            )
        )
        .with_panel(
            series(
                "Allow list",
                "Cgroups in the allow map: allowed, and audited (namespaces in audit mode).",
                "short",
                query(f"sum by (node) (imds_guard_allowlisted_cgroups{{{NODES}}})", "allowed {{node}}", "A"),
                query(f"sum by (node) (imds_guard_audited_cgroups{{{NODES}}})", "audited {{node}}", "B"),
            )
        )
        .with_row(dashboard.Row("Attempts"))
        .with_panel(
            series(
                "Attempts by pod, destination and verdict",
                "Attempts to reach a denied destination, per second. Past the daemon's bound, pods count as _other.",
                "reqps",
                query(
                    "sum by (namespace, pod, destination, verdict) "
                    f"(rate(imds_guard_attempts_total{{{NODES}}}[$__rate_interval]))",
                    "{{namespace}}/{{pod}} {{destination}} {{verdict}}",
                ),
            ).span(24)
        )
        .with_panel(
            table.Panel()
            .title("Most refused pods in the time range")
            .description("Attempts in the dashboard's time range, by namespace, pod, destination and verdict.")
            .datasource(DATASOURCE)
            .with_target(
                query(
                    "topk(20, sum by (namespace, pod, destination, verdict) "
                    f"(increase(imds_guard_attempts_total{{{NODES}}}[$__range])))",
                    "",
                )
                .instant()
                .format(PromQueryFormat.TABLE)
            )
            .height(8)
            .span(24)
        )
        .with_row(dashboard.Row("Latency"))
        .with_panel(latency("Reconcile latency", "imds_guard_reconcile_duration_seconds"))
        .with_panel(latency("Allow map update latency", "imds_guard_map_update_duration_seconds"))
        .with_row(dashboard.Row("Losses and errors"))
        .with_panel(
            series(
                "Dropped events",
                "Attempts refused without a log record or Event (per-cgroup rate limit, full ring), per second.",
                "reqps",
                query(f"sum by (node) (rate(imds_guard_events_dropped_total{{{NODES}}}[$__rate_interval]))", "{{node}}"),
            )
        )
        .with_panel(
            series(
                "Errors",
                "Failures the daemon retries, by kind (map_write, watch, taint, edge), per second.",
                "reqps",
                query(
                    f"sum by (node, kind) (rate(imds_guard_errors_total{{{NODES}}}[$__rate_interval]))",
                    "{{kind}} {{node}}",
                ),
            )
        )
    )
    # Grafana wants panel ids unique within the dashboard; the builders
    # leave them unset (rows at 0), so number them in order.
    model = built.build()
    for number, panel in enumerate(model.panels, start=1):
        panel.id_val = number
    return model


if __name__ == "__main__":
    json.dump(build(), sys.stdout, cls=JSONEncoder, indent=2, sort_keys=True)
    sys.stdout.write("\n")
