"""Component `convert`: a pickled or original-layout checkpoint -> a safetensors model."""


def convert_checkpoint(config_json: str) -> str:
    """Run `mmjobs.stages.convert`; returns the converted model's URI (the recipe's `to`).
    An identical earlier conversion is reused."""
    import json

    from mmjobs.stages import convert as stage

    return stage.main(stage.ConvertConfig.model_validate(json.loads(config_json))).output


COMPONENT = convert_checkpoint
