"""Component `import`: a hub repo, URL or store path -> a committed directory in the store."""


def import_source(config_json: str) -> str:
    """Run `mmjobs.stages.import_`; returns the committed copy's URI (the recipe's `to`, else
    {store}/{experiment}/{run}/import). An identical earlier import is reused."""
    import json

    from mmjobs.stages import import_ as stage

    return stage.main(stage.ImportConfig.model_validate(json.loads(config_json))).output


COMPONENT = import_source
