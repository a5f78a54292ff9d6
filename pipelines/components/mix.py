"""Component `mix`: concatenate canonical datasets that share an image root."""


def mix(config_json: str, datasets: list) -> str:
    """Run `mmjobs.stages.mix` on `datasets` (URIs, in order); returns the mixed dataset URI."""
    import json

    from mmjobs.stages import mix as stage

    config = {**json.loads(config_json), "datasets": list(datasets)}
    return stage.main(stage.MixConfig.model_validate(config)).output


COMPONENT = mix
