"""The step kernel: what both step images (trainer and evaluator) share, and nothing the operator needs.

- :mod:`ftc_step.entry`: a step's edges: read the input document, run the body, map ``StepError(retryable)``
  to the exit code, write the summary to the termination log;
- :mod:`ftc_step.runtime`: SIGTERM, credential redaction, the termination log;
- :mod:`ftc_step.errors`: ``StepError`` and what counts as transient;
- :mod:`ftc_step.devices`: GPU or nothing;
- :mod:`ftc_step.storage`: S3, local paths and verified transfers;
- :mod:`ftc_step.loading`: loading a base model and tokenizer the same way in both images;
- :mod:`ftc_step.modeling`: the chat-template and router conventions both images must share.

It depends on :mod:`ftc_api` (the documents it reads and writes) and never on the operator, the trainer or
the evaluator (import-linter contracts).
"""
