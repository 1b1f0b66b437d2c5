"""Bench: latency/throughput of every artefact of a bundle on every available runtime that serves its target,
accuracy against the teacher and the float student (on the bundle's reference set, or a whole validation
set), the recipe's accuracy gate, and a report written into the bundle."""
from kdtool.bench.accuracy import GateFailed
from kdtool.bench.eval_set import reference_eval_set
from kdtool.bench.loading import Artefact, Bundle, load_bundle
from kdtool.bench.report import gate_verdict, print_report
from kdtool.bench.run import resolve_settings, run_bench
from kdtool.bench.runtimes import RUNTIMES, Runtime, RunnerOptions, artefact_table, serving_runtimes
from kdtool.bench.timing import latency_stats, measure
from kdtool.bundle import find_latest_bundle

__all__ = ["Artefact", "Bundle", "GateFailed", "RUNTIMES", "Runtime", "RunnerOptions", "artefact_table",
           "find_latest_bundle", "gate_verdict", "latency_stats", "load_bundle", "measure", "print_report",
           "reference_eval_set", "resolve_settings", "run_bench", "serving_runtimes"]
