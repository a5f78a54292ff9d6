"""Component `merge`: base model + LoRA adapter -> a standalone model directory."""


def merge(config_json: str, base: str, adapter: str) -> str:
    """Run `mmjobs.stages.merge`; returns the merged model directory URI."""
    import json

    from mmjobs.stages import merge as stage

    config = {**json.loads(config_json), "base": base, "adapter": adapter}
    return stage.main(stage.MergeConfig.model_validate(config)).output


COMPONENT = merge
