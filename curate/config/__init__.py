"""Pipeline configuration: safe YAML with line numbers, typed models, all errors at once."""

from curate.config.load import Pipeline, load_pipeline, validate_data
from curate.config.model import BoundStage, PipelineSpec, SinkSpec, SourceSpec, StageSpec
from curate.config.yamlpos import ConfigError, Issue

__all__ = [
    "BoundStage",
    "ConfigError",
    "Issue",
    "Pipeline",
    "PipelineSpec",
    "SinkSpec",
    "SourceSpec",
    "StageSpec",
    "load_pipeline",
    "validate_data",
]
