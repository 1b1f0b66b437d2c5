"""Bench: latency/throughput of every artefact of a bundle on every available runtime that serves its target,
accuracy against the teacher and the float student (on the bundle's reference set, or a whole validation
set), the recipe's accuracy gate, and a report written into the bundle."""
from kdtool.bench.accuracy import GateFailed
from kdtool.bench.bundle import Artefact, Bundle, load_bundle
from kdtool.bench.report import gate_verdict, print_report
from kdtool.bench.run import reference_eval_set, resolve_settings, run_bench
from kdtool.bench.runtimes import RUNTIMES, RunnerOptions
from kdtool.bench.timing import latency_stats, measure
from kdtool.bundle import find_latest_bundle

__all__ = ["Artefact", "Bundle", "GateFailed", "RUNTIMES", "RunnerOptions", "find_latest_bundle", "gate_verdict",
           "latency_stats", "load_bundle", "measure", "print_report", "reference_eval_set", "resolve_settings",
           "run_bench"]
