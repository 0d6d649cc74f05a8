"""moka-train: train MoKA adapters over a 4-bit base model.

The base models it trains on by default (the embedded SmolLM2-135M-Instruct, the tiny test Llama)
live in ``moka_serve.base_models``: the server needs them too, and the server never imports the
trainer.

Modules (imported on demand, so ``import moka_trainer`` stays cheap):

* ``moka_trainer.train``: ``TrainConfig``, ``train(cfg)`` (the loop behind ``moka-train``),
  ``load_base_model``, ``evaluate``, ``greedy_completions``.
* ``moka_trainer.moka_layer``: ``MokaLinear``, ``inject_moka``, ``export_adapter`` (model ->
  ``MokaAdapter``), ``attach_adapter`` (a loaded adapter onto a model, unmerged), ``remove_moka``.
* ``moka_serve.shapes`` (core, shared with ``moka-bench``): exact Kronecker factorisations,
  ``plan_shapes`` (from a budget or explicit ``--shapes``), ``parse_shapes``, ``parse_budget``,
  ``lora_params``.
* ``moka_trainer.data``: JSONL records -> token ids with completion-only labels.
* ``moka_trainer.reference``: merged reference models and greedy generation for serving tests.
* ``moka_trainer.cli``: the ``moka-train`` command.
"""
