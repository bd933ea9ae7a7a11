"""The survey pipeline behind ``galprof fit``: catalogue in, result tables and image blocks out;
streaming, resumable, and robust to bad input (see docs/pipeline.md)."""

from .run import FitOptions, Interrupted, PipelineOptions, describe_device, run_pipeline
from .store import ResultStore

__all__ = ["FitOptions", "Interrupted", "PipelineOptions", "ResultStore", "describe_device", "run_pipeline"]
