"""Component `serve`: `mmjobs serve` inside the step's own pod, until the pod is stopped.

The step never ends by itself and has no Service in front of it; for a review server that
outlives the run use the `deploy` component (a Deployment + Service, see mmjobs.stages.deploy).
"""


def serve(config_json: str, model: str, adapter: str = "") -> str:
    """Run `mmjobs.stages.serve` (empty `adapter`: not wired, the config decides); returns the
    URL it served at once stopped."""
    import json

    from mmjobs.stages import serve as stage

    wired = {"model": model, "adapter": adapter}
    config = {**json.loads(config_json), **{k: v for k, v in wired.items() if v}}
    return stage.main(stage.ServeConfig.model_validate(config)).output


COMPONENT = serve
