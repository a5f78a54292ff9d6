"""Models: HF vision-language model builders, connectors, and tiny models built from configs.

Submodules import transformers lazily (it takes seconds), so importing this package is cheap.

- `mmjobs.models.tiny`: tiny LLaVA and Chameleon models + a locally trained tokenizer, saved as
  ordinary Hugging Face directories (no hub downloads) for tests and the CPU demo.
"""
