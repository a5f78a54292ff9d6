"""KFP pipelines for the mmjobs recipes (`recipes/*.yaml`), one file per pipeline.

`PIPELINES` maps a recipe's `pipeline:` name to its module, which has `NAME` and
`wire(build)`: the steps and what feeds what, nothing else (configs, images and cluster
settings come from `pipelines.builder.Build`). `mmjobs.pipeline_runner` runs, compiles and
submits them.
"""

from __future__ import annotations

from types import ModuleType

from pipelines import (
    chameleon_interleaved,
    chart_demo,
    chartmoe,
    chartwiz,
    lavin_sweep,
    llava_dataengine,
)

PIPELINES: dict[str, ModuleType] = {
    m.NAME: m for m in (chart_demo, llava_dataengine, chartwiz, chartmoe, lavin_sweep,
                        chameleon_interleaved)
}
