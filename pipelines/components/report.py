"""Component `report`: plots and comparison tables over this pipeline run's MLflow runs."""


def report(config_json: str) -> str:
    """Run `mmjobs.stages.report` (ordered after the evaluations by the pipeline); returns
    the committed report folder URI."""
    from mmjobs.stages import report as stage

    return stage.main(stage.ReportConfig.model_validate_json(config_json)).output


COMPONENT = report
