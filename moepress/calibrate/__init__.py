"""Layer-by-layer calibration and the per-expert statistics it collects."""

from moepress.calibrate.runner import (
    CalibrationResult,
    calibrate,
    calibrate_hooked,
    capture_inputs,
    run_layer,
)
from moepress.calibrate.stats import CalibrationStats, LayerStats

__all__ = [
    "CalibrationResult",
    "CalibrationStats",
    "LayerStats",
    "calibrate",
    "calibrate_hooked",
    "capture_inputs",
    "run_layer",
]
