"""Serve a trained model: an OpenAI-compatible chat-completions API and a chat page.

- `app`: the routes (`create_app`, `ServeOptions`); `server`: uvicorn in the foreground or a
  thread; `batching`: the generation worker that batches concurrent requests; `engine`:
  batched and streamed generation on `mmjobs.eval.generate.Generator`; `protocol`: the OpenAI
  wire format; `images`, `limits`, `auth`, `metrics`: request checks and observability;
  `page`: the chat page.

The stage `mmjobs.stages.serve` (`mmjobs serve MODEL_URI`) loads a model from the store and runs
all of this. Imports are left to the submodules: importing `mmjobs.serve` costs nothing.
"""
