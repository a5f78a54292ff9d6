"""Component `evaluate`: score predictions; metrics and tables also as KFP UI artifacts."""

from kfp.dsl import Markdown, Metrics, Output


def evaluate(config_json: str, predictions: str, metrics: Output[Metrics],
             summary: Output[Markdown]) -> str:
    """Run `mmjobs.stages.evaluate`; returns the committed output URI (summary.json inside)."""
    import json

    from mmjobs.stages import evaluate as stage

    config = {**json.loads(config_json), "predictions": predictions}
    result = stage.main(stage.EvaluateConfig.model_validate(config))
    for name, value in stage.kfp_metrics(result.summary).items():
        metrics.log_metric(name, value)
    with open(summary.path, "w", encoding="utf-8") as f:
        f.write(stage.kfp_markdown(result.summary))
    return result.output


COMPONENT = evaluate
