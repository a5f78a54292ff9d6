"""Component `deploy`: run a model as a review server (Deployment + Service) and wait for it."""


def deploy(config_json: str, model: str, adapter: str = "") -> str:
    """Run `mmjobs.stages.deploy` with the step pod's service account (empty `adapter`: not
    wired, the config decides); returns the server's in-cluster URL (chat page at /, OpenAI
    API at /v1)."""
    import json

    from mmjobs.stages import deploy as stage

    wired = {"model": model, "adapter": adapter}
    config = {**json.loads(config_json), **{k: v for k, v in wired.items() if v}}
    return stage.main(stage.DeployConfig.model_validate(config)).output


COMPONENT = deploy
