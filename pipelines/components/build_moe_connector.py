"""Component `build-moe-connector`: aligned connectors -> a model with ChartMoE's MoE-MLP."""


def build_moe_connector(config_json: str, base: str, expert_names: list, experts: list) -> str:
    """Run `mmjobs.stages.build_moe_connector` with `experts[i]` named `expert_names[i]`
    (in expert order); returns the model directory URI."""
    import json

    from mmjobs.stages import build_moe_connector as stage

    config = {**json.loads(config_json), "base": base,
              "experts": dict(zip(expert_names, experts, strict=True))}
    return stage.main(stage.BuildMoeConfig.model_validate(config)).output


COMPONENT = build_moe_connector
