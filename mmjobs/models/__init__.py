"""Models: HF vision-language model builders, connectors, and tiny models built from configs.

Submodules import transformers lazily (it takes seconds), so importing this package is cheap.

- `mmjobs.models.tiny`: tiny LLaVA and Chameleon models + a locally trained tokenizer, saved as
  ordinary Hugging Face directories (no hub downloads) for tests and the CPU demo.
"""


def register_native_models() -> None:
    """Teach transformers' Auto classes (`AutoConfig`, `AutoModelForImageTextToText`,
    `AutoProcessor`) the model types mmjobs implements itself instead of running a checkpoint's
    remote code: InternLM-XComposer2 (`mmjobs.models.xcomposer2`), LaVIN
    (`mmjobs.models.lavin`) and ChartWiz's DePlot-LLaVA (`mmjobs.models.deplot`). Idempotent
    and cheap after the first call; everything that reads a model directory calls it first,
    so such a directory loads with `trust_remote_code` off."""
    from mmjobs.models import deplot, lavin, xcomposer2

    xcomposer2.register()
    lavin.register()
    deplot.register()
