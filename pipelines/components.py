"""KFP components: one lightweight Python component per stage, made from its declaration.

KFP embeds a lightweight component's function source in the compiled pipeline and runs it in
the step's image. Each stage's function is generated from the stage registry
(`mmjobs.stages.registry`): its parameters are `config_json` (the step's config without its
wired inputs) and the stage's declared inputs and output artifacts, and its body hands them to
`run_component`, which fills the wired URIs into the config, validates it and runs the stage.
So the compiled IR shows each stage's own parameters and a three-line body, e.g.::

    def merge(config_json: str, base: str, adapter: str, kfp_run_id: str = "") -> str:
        from mmjobs.stages.registry import run_component

        return run_component('merge', config_json, base=base, adapter=adapter,
                             kfp_run_id=kfp_run_id)

Stages with knobs (`Stage.knobs`: learning rate, steps, data URIs, row limits) take one
optional parameter per knob (`set__train__lr: float = None`), fed from the pipeline's
parameters; `kfp_run_id` gets KFP's job id on cluster runs that make their own folders.

KFP passes strings and small values; datasets and models stay in the store. Stages that make
them declare a `Dataset` / `Model` output artifact whose URI `run_component` points at the
committed output (nothing is copied), so they show, typed, in the KFP UI's run graph and
lineage.
`install_kfp_package=False`: the stage images ship kfp themselves, and the local runner uses
the current environment.
"""

from __future__ import annotations

import functools
import keyword
import linecache
from collections.abc import Callable

from kfp import dsl

from mmjobs.stages import registry

_TYPES = {str: "str", int: "int", float: "float", list: "list"}


def component(stage: str, image: str, *, part: bool = False) -> Callable[..., dsl.PipelineTask]:
    """The KFP component running `stage` in `image` (`part`: see `component_function`)."""
    return dsl.component(component_function(stage, part=part), base_image=image,
                         install_kfp_package=False)


@functools.cache
def component_function(stage: str, *, part: bool = False) -> Callable[..., str]:
    """The Python function of `stage`'s component (what KFP embeds and runs).

    `part`: the component of one fan-out part of a step (`<stage>_part`), which writes into
    the step's output but does not commit it, so it declares none of the stage's output
    artifacts: a typed `Dataset` there would point at an entry that is not complete yet.
    Only the step's own (committing) task exposes them.
    """
    spec = registry.get(stage)
    name = spec.name.replace("-", "_") + ("_part" if part else "")
    if keyword.iskeyword(name):
        name += "_"  # `import` -> import_, like its module
    outputs = {} if part else spec.outputs
    params = ["config_json: str"]
    params += [f"{i.name}: {_TYPES[i.type]}" for i in spec.inputs if i.default is ...]
    params += [f"{out}: Output[{kind}]" for out, kind in outputs.items()]
    params += [f"{i.name}: {_TYPES[i.type]} = {i.default!r}"
               for i in spec.inputs if i.default is not ...]
    # The stage's knobs: None when the step has no pipeline parameter for them.
    params += [f"{k.input_name}: {_TYPES[k.type]} = None" for k in spec.knobs]
    params.append('kfp_run_id: str = ""')
    passed = [*(i.name for i in spec.inputs), *(k.input_name for k in spec.knobs),
              "kfp_run_id", *outputs]
    call = ", ".join(["config_json", *(f"{p}={p}" for p in passed)])
    doc = (f"{spec.summary} Stage `{spec.name}`, one fan-out part: returns the step's output "
           "URI, not committed yet (the step's own task commits it)." if part else
           f"{spec.summary} Stage `{spec.name}`; returns its output URI.")
    source = (f"def {name}({', '.join(params)}) -> str:\n"
              f'    """{doc}"""\n'
              f"    from mmjobs.stages.registry import run_component\n\n"
              f"    return run_component({spec.name!r}, {call})\n")
    filename = f"<mmjobs component {spec.name}{' part' if part else ''}>"
    # KFP reads the source back with inspect.getsource, which finds it in linecache.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"Output": dsl.Output, "Metrics": dsl.Metrics, "Markdown": dsl.Markdown,
                 "HTML": dsl.HTML, "Model": dsl.Model, "Dataset": dsl.Dataset,
                 "__name__": __name__}
    # dont_inherit: this module's `from __future__ import annotations` would make the
    # annotations strings, which KFP reads as artifact type names.
    exec(compile(source, filename, "exec", dont_inherit=True), namespace)
    return namespace[name]
