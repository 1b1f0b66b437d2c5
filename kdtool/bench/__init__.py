"""Bench: latency/throughput of every artefact of a bundle on every available runtime, accuracy against
the teacher and the float student, the recipe's accuracy gate, and a report written into the bundle."""
from kdtool.bench.accuracy import GateFailed
from kdtool.bench.bundle import find_latest_bundle, load_bundle
from kdtool.bench.report import print_report
from kdtool.bench.run import run_bench
from kdtool.bench.timing import latency_stats, measure

__all__ = ["GateFailed", "find_latest_bundle", "latency_stats", "load_bundle", "measure", "print_report", "run_bench"]
