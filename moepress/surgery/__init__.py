"""Model surgery: apply a CompressionPlan (changes the model, decides nothing), and compare plans."""

from moepress.surgery.apply import SourceRecord, apply_plan, uniform_expert_count
from moepress.surgery.diff import diff_plans

__all__ = ["SourceRecord", "apply_plan", "diff_plans", "uniform_expert_count"]
