"""Component `prepare`: a raw dataset in a published layout -> a canonical dataset."""


def prepare(config_json: str) -> str:
    """Run `mmjobs.stages.prepare`; returns the committed dataset URI."""
    from mmjobs.stages import prepare as stage

    return stage.main(stage.PrepareConfig.model_validate_json(config_json)).output


COMPONENT = prepare
