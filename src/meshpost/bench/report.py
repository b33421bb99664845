"""The report of a bench run: the summary table (terminal and markdown), the plots, the
machine it ran on.

Rule: reads results, writes files and the terminal; runs nothing. matplotlib is optional (the
`bench` extra): without it the run still writes JSON and markdown and says why no plots.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from meshpost.bench.options import BenchOptions
from meshpost.bench.results import ScenarioResult
from meshpost.bench.support import optional
from meshpost.config import DEFAULT_WINDOW


def machine_info() -> dict[str, Any]:
    import msgspec
    import zmq

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from meshpost import __version__

    return {
        "cpu": cpu, "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30,
                           1),
        "os": platform.platform(), "python": platform.python_version(),
        "meshpost": __version__, "pyzmq": zmq.pyzmq_version(), "libzmq": zmq.zmq_version(),
        "sqlite": sqlite3.sqlite_version, "msgspec": msgspec.__version__,
    }


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f} msgs/s"


def _fmt_lat(p: dict[str, float]) -> str:
    return " / ".join(f"{p[k]:,.0f}" for k in ("p50", "p90", "p99", "p99.9") if k in p)


def summary_rows(results: dict[str, ScenarioResult]) -> list[tuple[str, str, str]]:
    """(scenario, figure, comparison) rows shared by the terminal table and the markdown."""
    rows: list[tuple[str, str, str]] = []
    for name, r in results.items():
        f = r.figures
        if r.status != "ok":
            rows.append((name, r.status.upper(), r.note))
            continue
        if name == "ceiling":
            rows.append((name, _fmt_rate(f["msgs_per_s"]), "raw pyzmq one-way (the 1.0×)"))
        elif name == "pair-throughput":
            ratio = f.get("ratio_to_ceiling")
            cpu = f.get("cpu_us_per_msg")
            rows.append((name, _fmt_rate(f["msgs_per_s"]),
                         (f"{ratio:.2f}× ceiling" if ratio is not None else "no ceiling")
                         + (f"; CPU {cpu['total']:.1f} µs/msg (A {cpu['A']:.1f}, B "
                            f"{cpu['B']:.1f})" if cpu else "")
                         + (f"; WAL peak A {wal['A']:.1f} MB, B {wal['B']:.1f} MB"
                            if (wal := f.get("wal_peak_mb")) else "")))
        elif name == "pair-latency":
            rows.append(("pair-latency raw", _fmt_lat(f["raw_pingpong_us"]) + " µs",
                         "pyzmq ping-pong p50/p90/p99/p99.9"
                         + _cpu_note(f.get("raw_cpu_us_per_round_trip"), "round trip")))
            if "loop_pingpong_us" in f:
                ratio = f["ratio_loop"]
                rows.append(("pair-latency loop", _fmt_lat(f["loop_pingpong_us"]) + " µs",
                             " / ".join(f"{ratio[k]:.1f}×" for k in ratio)
                             + " raw: the same ping-pong on the nodes' event loop "
                             + f"({f.get('loop', 'asyncio')})"
                             + _cpu_note(f.get("loop_cpu_us_per_round_trip"), "round trip")))
            for key, value in f.items():
                if key.startswith("meshpost_"):
                    sync = key.split("_")[1]
                    ratio = f[f"ratio_{sync}"]
                    cpu = f.get(f"cpu_us_per_send_{sync}")
                    loaded = f.get(f"cpu_us_per_send_{sync}_loaded")
                    rows.append((f"pair-latency {sync}", _fmt_lat(value) + " µs",
                                 " / ".join(f"{ratio[k]:.1f}×" for k in ratio) + " raw"
                                 + (f"; CPU {cpu['total']:,.0f} µs/send (A {cpu['A']:,.0f}, "
                                    f"B {cpu['B']:,.0f})" if cpu else "")
                                 + (f" = {f[f'cpu_over_raw_{sync}']:.1f}× raw's, "
                                    f"{f[f'cpu_over_reference_{sync}']:.1f}× the reference's"
                                    if f"cpu_over_reference_{sync}" in f else "")
                                 + (f"; with {f['loaded_senders']} senders at once "
                                    f"{loaded['total']:,.0f} µs/send" if loaded else "")))
                    if f"floor_{sync}_us" in f:
                        ratio, over = f[f"ratio_floor_{sync}"], f[f"over_floor_{sync}"]
                        rows.append((f"pair-latency floor {sync}",
                                     _fmt_lat(f[f"floor_{sync}_us"]) + " µs",
                                     " / ".join(f"{ratio[k]:.1f}×" for k in ratio)
                                     + f" raw: loop ping-pong ({f.get('loop', 'asyncio')})"
                                     + " + the 2 commits on the path"
                                     + " alone; meshpost is "
                                     + " / ".join(f"{over[k]:.1f}×" for k in over) + " of it"))
                    if f"reference_{sync}_us" in f:
                        ratio, over = f[f"ratio_reference_{sync}"], f[f"over_reference_{sync}"]
                        rows.append((f"pair-latency reference {sync}",
                                     _fmt_lat(f[f"reference_{sync}_us"]) + " µs",
                                     " / ".join(f"{ratio[k]:.1f}×" for k in ratio)
                                     + " raw: blocking pyzmq + sqlite3 WAL, the same 3 commits,"
                                     " one at a time"
                                     + _cpu_note(f[f"reference_cpu_us_per_send_{sync}"], "send")
                                     + f" = {f[f'reference_cpu_over_raw_{sync}']:.1f}× raw's"
                                     + "; meshpost is "
                                     + " / ".join(f"{over[k]:.1f}×" for k in over) + " of it"))
        elif name == "send-timeline":
            total = f["total_p50_us"]
            rows.append((f"send-timeline {f['sync']}", f"{total:,.0f} µs p50 with probes",
                         "; ".join(f"{kind} {us:,.0f} µs ({us / total:.0%})"
                                   for kind, us in f["kinds_p50_us"].items())
                         + f" ({f['usual']:,} of {f['sends']:,} sends in the usual order)"
                         + "".join(_tail_note(t) for t in f.get("tails", []))))
        elif name == "mesh" and "per_process" in f:
            idle = f.get("idle_cpu_pct_of_core")
            rows.append((f"mesh {f['nodes']} nodes, {f['per_process']}/process, "
                         f"{f['fanout']} peers each", _fmt_rate(f["msgs_per_s"]),
                         f"CPU {f['cpu_us_per_msg']:.1f} µs/msg; RSS {f['rss_mb_per_node']:.1f}"
                         " MB/node" + (f"; idle {idle:.1f}% of a core over {f['idle_s']:g} s"
                                       f" from {f.get('idle_after_s', 0):g} s after the last"
                                       " message" if idle is not None else "")
                         + f"; latency p50/p90/p99/p99.9 {_fmt_lat(f['latency_us'])} µs"))
        elif name == "mesh":
            rows.append((f"mesh {f['nodes']} nodes, latency-bound", _fmt_rate(f["msgs_per_s"]),
                         f"latency p50/p90/p99/p99.9 {_fmt_lat(f['latency_us'])} µs"))
        elif name == "mesh-saturated":
            ratio = f.get("ratio_to_pair")
            rows.append((f"mesh {f['nodes']} nodes, saturated", _fmt_rate(f["msgs_per_s"]),
                         (f"{ratio:.2f}× pair-throughput" if ratio is not None
                          else "no pair-throughput in this run")
                         + f"; CPU {f['cpu_us_per_msg']:.1f} µs/msg (all nodes)"))
        elif name == "offline-backlog":
            rows.append((f"offline-backlog {f['messages']:,}",
                         f"RSS +{f['rss_growth_mb']} MB",
                         f"drain {f['drain_seconds']:.1f} s ({f['drain_msgs_per_s']:,} msgs/s)"))
        elif name == "work-queue":
            cpu, raw_cpu = f["cpu_us_per_task"], f["raw_cpu_us_per_task"]
            rows.append((f"work-queue {f['tasks']:,} tasks", f"{f['tasks_per_s']:,.0f} tasks/s",
                         f"{f['ratio_to_raw']:.3g}× raw PUSH/PULL ({f['raw_tasks_per_s']:,.0f} "
                         f"tasks/s); CPU {cpu['total']:,.0f} µs/task (V {cpu['V']:,.0f}, W1 "
                         f"{cpu['W1']:,.0f}, W2 {cpu['W2']:,.0f}, S {cpu['S']:,.0f})"
                         + f", raw {raw_cpu:,.1f}"))
        elif name == "broker-anchors":
            for broker, b in f.items():
                rows.append((broker, _fmt_rate(b["msgs_per_s"]),
                             f"latency {_fmt_lat(b['latency_us'])} µs"))
    if "broker-anchors" in results and results["broker-anchors"].note:
        rows.append(("broker-anchors", "note", results["broker-anchors"].note))
    return rows


def write_markdown(path: Path, results: dict[str, ScenarioResult], info: dict[str, Any],
                   options: BenchOptions) -> None:
    lines = [
        "# meshpost bench",
        "",
        f"Command: `{options.command}`  ",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; "
        f"{info['os']}  ",
        f"Versions: meshpost {info['meshpost']}, Python {info['python']}, pyzmq "
        f"{info['pyzmq']} (libzmq {info['libzmq']}), SQLite {info['sqlite']}, msgspec "
        f"{info['msgspec']}  ",
        f"Bodies of {options.size} bytes; sync={options.sync}; transport={options.transport}; "
        f"event loop={options.loop}; "
        f"pair window={options.window or f'node default ({DEFAULT_WINDOW})'}.",
        "",
        "| scenario | result | comparison |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(results)]
    timeline = results.get("send-timeline")
    if timeline is not None and timeline.status == "ok":
        lines += ["", f"Timeline of a send (`send-timeline`, sync={timeline.figures['sync']}, "
                  "A sends, B receives; p50 and mean of each step in µs):", "",
                  "| from | to | kind | p50 | mean |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {st['start']} | {st['stop']} | {st['kind']} | {st['p50_us']:,.1f} | "
                  f"{st['mean_us']:,.1f} |" for st in timeline.figures["steps"]]
        for tail in timeline.figures.get("tails", []):
            lines += ["", f"The slowest {tail['share']:.1%} of sends ({tail['sends']}, "
                      f"{tail['min_us']:,.0f}-{tail['max_us']:,.0f} µs, {tail['usual']} in the "
                      "usual order): the steps that grew the most, then the events beside "
                      "them (share of these sends they overlapped / of all sends):", "",
                      "| from | to | kind | p50 of all | p50 here | mean here |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {g['start']} | {g['stop']} | {g['kind']} | {g['p50_us']:,.1f} | "
                      f"{g['tail_p50_us']:,.1f} | {g['tail_mean_us']:,.1f} |"
                      for g in tail["grown"]]
            lines += ["", "; ".join(f"{name} {here:.0%} / {everywhere:.1%}"
                                    for name, (here, everywhere) in tail["events"].items())
                      or "no events"]
            if tail["unusual_stamps"]:
                lines += ["", "stamps of the unusual sends against the usual order: " + ", ".join(
                    f"{k} {v:+d}" for k, v in tail["unusual_stamps"].items())]
    lines += ["", "Verification (every scenario ends with `verify_stores` over all stores):", ""]
    lines += [f"- {name}: {r.verify or r.note}" for name, r in results.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cpu_note(cpu: dict[str, float] | None, per: str) -> str:
    """'; CPU T µs/PER (A a, B b)' for both processes' CPU a round trip or send ('' if not
    measured: results from before the figure)."""
    if not cpu:
        return ""
    return f"; CPU {cpu['total']:,.0f} µs/{per} (A {cpu['A']:,.0f}, B {cpu['B']:,.0f})"


def _tail_note(tail: dict[str, Any]) -> str:
    """'; slowest 1% from N µs, beside: the events that overlapped it most (share)'."""
    events = sorted(tail["events"].items(), key=lambda e: e[1][0], reverse=True)
    beside = ", ".join(f"{name} {here:.0%}" for name, (here, _all) in events[:2] if here)
    return (f"; slowest {tail['share']:.1%} from {tail['min_us']:,.0f} µs"
            + (f", beside {beside}" if beside else ""))


def write_plots(plot_dir: Path, results: dict[str, ScenarioResult]) -> list[Path] | None:
    """Throughput bars and latency CDFs; None (and no error) without matplotlib."""
    try:
        optional("matplotlib").use("Agg")
        plt = optional("matplotlib.pyplot")
    except ImportError:
        return None
    plot_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    bars: list[tuple[str, float]] = []
    if (c := results.get("ceiling")) and c.status == "ok":
        bars.append(("raw pyzmq one-way", c.figures["msgs_per_s"]))
    if (p := results.get("pair-throughput")) and p.status == "ok":
        bars.append((f"meshpost pair (sync={p.figures['sync']})", p.figures["msgs_per_s"]))
    if (m := results.get("mesh")) and m.status == "ok":
        bars.append((f"meshpost mesh {m.figures['nodes']} nodes, latency-bound",
                     m.figures["msgs_per_s"]))
    if (m := results.get("mesh-saturated")) and m.status == "ok":
        bars.append((f"meshpost mesh {m.figures['nodes']} nodes, saturated",
                     m.figures["msgs_per_s"]))
    if (b := results.get("broker-anchors")) and b.status == "ok":
        for broker, fig in b.figures.items():
            bars.append((broker, fig["msgs_per_s"]))
    if bars:
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(bars) + 1.5))
        labels = [label for label, _ in bars]
        values = [value for _, value in bars]
        ax.barh(labels, values, color="#4477aa")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}", va="center")
        ax.invert_yaxis()
        ax.set_xlabel("messages per second (receipted where the system has receipts)")
        ax.set_title("Throughput, 100-byte bodies, loopback")
        fig.tight_layout()
        path = plot_dir / "throughput.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    curves = {k: v for r in results.values() for k, v in r.samples.items() if v}
    if curves:
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, samples in curves.items():
            s = sorted(samples)
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("latency (µs, log scale)")
        ax.set_ylabel("fraction of messages")
        ax.set_title("Latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = plot_dir / "latency-cdf.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def print_table(console: Console, results: dict[str, ScenarioResult]) -> None:
    table = Table(title="meshpost bench")
    for col in ("scenario", "result", "comparison"):
        table.add_column(col)
    for a, b, c in summary_rows(results):
        # Notes quote commands such as `pip install -e '.[bench]'`: text, never markup.
        table.add_row(escape(a), escape(b), escape(c))
    console.print(table)

