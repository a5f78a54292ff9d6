"""Component `pretokenize`: canonical dataset -> cached Parquet shards for a model's processor."""


def pretokenize(config_json: str, dataset: str, model: str) -> str:
    """Run `mmjobs.stages.pretokenize`; returns the committed shards URI (a cache entry)."""
    import json

    from mmjobs.stages import pretokenize as stage

    config = {**json.loads(config_json), "dataset": dataset, "model": model}
    return stage.main(stage.PretokenizeConfig.model_validate(config)).output


COMPONENT = pretokenize
