"""`meshpost bench`: meshpost's throughput and latency next to raw pyzmq and two brokers.

Rule: a figure counts only if it was earned honestly and checked. Every scenario runs real node
processes with real SQLite files on loopback (127.0.0.1 or ipc://) with the configured sync
level; a message counts only once its receipt is recorded by the sender; every scenario ends
with `verify_stores` over all of its stores, and a scenario whose stores do not verify reports
FAILED, never a figure. Raw pyzmq baselines are measured in the same run, so the figures that
matter are ratios, which travel across machines better than absolute numbers.

The package: `options` (the scenario registry, options, limits; standard library only, read by
`meshpost --help`), `runner` (one run: work folder, progress, helper processes), `scenarios/`
(one module per scenario, each module's docstring says how it drives meshpost), `children` and
`drive` (helper processes and the node driver), `meters`, `servers` (brokers), `report` (table,
markdown, plots). Results: JSON, markdown and PNG plots under `benchmarks/results/`.

Names are re-exported lazily, so that importing this package (or `meshpost.bench.options`)
loads neither a node nor rich.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshpost.lazy import lazy_exports

if TYPE_CHECKING:
    from meshpost.bench.options import (
        DEFAULT_RESULTS_DIR,
        REGISTRY,
        SCENARIOS,
        BenchError,
        BenchOptions,
        default_out_dir,
        options_from_args,
    )
    from meshpost.bench.report import (
        machine_info,
        print_table,
        summary_rows,
        write_markdown,
        write_plots,
    )
    from meshpost.bench.results import ScenarioResult, cdf_points, percentiles
    from meshpost.bench.runner import Bench, run
    from meshpost.bench.support import mesh_timers

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("DEFAULT_RESULTS_DIR", "REGISTRY", "SCENARIOS", "BenchError",
                     "BenchOptions", "default_out_dir", "options_from_args"),
                    "meshpost.bench.options"),
    **dict.fromkeys(("machine_info", "print_table", "summary_rows", "write_markdown",
                     "write_plots"), "meshpost.bench.report"),
    **dict.fromkeys(("ScenarioResult", "cdf_points", "percentiles"), "meshpost.bench.results"),
    **dict.fromkeys(("Bench", "run"), "meshpost.bench.runner"),
    "mesh_timers": "meshpost.bench.support",
}

__all__ = [
    "DEFAULT_RESULTS_DIR",
    "REGISTRY",
    "SCENARIOS",
    "Bench",
    "BenchError",
    "BenchOptions",
    "ScenarioResult",
    "cdf_points",
    "default_out_dir",
    "machine_info",
    "mesh_timers",
    "options_from_args",
    "percentiles",
    "print_table",
    "run",
    "summary_rows",
    "write_markdown",
    "write_plots",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
