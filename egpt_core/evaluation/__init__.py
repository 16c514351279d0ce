"""Stage 4: metrics, speedup model, plots and reports (DESIGN.md §4.3; reference §9, §12.2)."""

from egpt_core.evaluation.evaluate import EvalResult, evaluate
from egpt_core.evaluation.metrics import MetricAccumulator
from egpt_core.evaluation.report import compare_runs
from egpt_core.evaluation.speedup import expected_speedup

__all__ = ["EvalResult", "MetricAccumulator", "compare_runs", "evaluate", "expected_speedup"]
