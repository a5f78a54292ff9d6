"""Component `apply-connector`: base model + aligned connector -> the model to fine-tune."""


def apply_connector(config_json: str, base: str, connector: str) -> str:
    """Run `mmjobs.stages.apply_connector`; returns the model directory URI."""
    import json

    from mmjobs.stages import apply_connector as stage

    config = {**json.loads(config_json), "base": base, "connector": connector}
    return stage.main(stage.ApplyConnectorConfig.model_validate(config)).output


COMPONENT = apply_connector
