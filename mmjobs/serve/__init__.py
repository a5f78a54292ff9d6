"""Serve a trained model: an OpenAI-compatible chat-completions API and a chat page.

- `app`: the routes (`create_app`, `ServeOptions`); `server`: uvicorn in the foreground or a
  thread, with connection deadlines; `batching`: the generation worker that batches
  concurrent requests; `engine`: batched and streamed generation on
  `mmjobs.eval.generate.Generator`, with per-row cancel and stop strings; `protocol`: the
  OpenAI wire format; `admission`: what a request must pass before it is queued (prompt
  tokens, pixels, decoded images); `connection`: body reading and client disconnects;
  `images`, `limits`, `auth`, `metrics`: request checks and observability; `page`: the chat
  page.

The stage `mmjobs.stages.serve` (`mmjobs serve MODEL_URI`) loads a model from the store and runs
all of this. Imports are left to the submodules: importing `mmjobs.serve` costs nothing.
"""
