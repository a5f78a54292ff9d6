"""Component `train`: align or SFT on one pod, or a multi-node TrainJob when nodes > 1."""


def train(config_json: str, data: str, model: str, nodes: int = 1, gpus_per_node: int = 0,
          image: str = "", launch_json: str = "{}", ptx_data: str = "") -> str:
    """Run `mmjobs.stages.train`; returns the model directory of a full fine-tune, else the
    training output (`final/adapter` or `final/connector` inside; merge, apply-connector and
    build-moe-connector find them there). With nodes > 1, `launch_json` holds the job's
    cluster settings (`mmjobs.train.k8s_jobs.JobSettings`: Secret names, never secrets).
    `ptx_data`: SFT shards mixed into ppo/grpo updates (train.rl.ptx_coef)."""
    import json

    from mmjobs.stages import train as stage

    config = json.loads(config_json)
    config["data"] = data
    config["model"] = {**config.get("model", {}), "name_or_path": model}
    if ptx_data:
        config["ptx_data"] = ptx_data
    cfg = stage.TrainStageConfig.model_validate(config)
    if nodes > 1:
        # Kubeflow Trainer TrainJob launched from this pod and followed to the end (issue #6,
        # item 5); it runs the same stage under torchrun on every node.
        from mmjobs.train.multinode import launch_multinode

        result = launch_multinode(cfg, nodes=nodes, gpus_per_node=gpus_per_node, image=image,
                                  settings=json.loads(launch_json or "{}"))
    else:
        result = stage.main(cfg)
    return result.model or result.output


COMPONENT = train
