"""moka-train: train MoKA adapters over a 4-bit base model.

The base models it trains on by default (the embedded SmolLM2-135M-Instruct, the tiny test Llama)
live in ``moka_core.base_models``: the server needs them too, and the server never imports the
trainer.

Modules (imported on demand, so ``import moka_trainer`` stays cheap):

* ``moka_trainer.train``: ``TrainConfig``, ``train(cfg)``: the recipe behind ``moka-train``, over
  transformers' ``Trainer`` with the adapter as a PEFT model (``moka_peft``'s MoKA, or LoRA).
* ``moka_trainer.base_model``: device, dtype, and the (4-bit) base with its tokenizer.
* ``moka_trainer.evaluation``: eval loss and greedy exact match, as a ``TrainerCallback``.
* ``moka_peft`` (the tuner, below the trainer): the one MoKA layer, and the planning of shapes
  from a budget (``moka_peft.planning``).
* ``moka_core.shapes`` (core, shared with ``moka-bench``): exact Kronecker factorisations,
  ``plan_shapes`` (from a budget or explicit ``--shapes``), ``parse_shapes``, ``parse_budget``,
  ``lora_params``.
* ``moka_trainer.data``: JSONL records -> token ids with completion-only labels.
* ``moka_core.reference``: merged reference models and greedy generation for serving tests.
* ``moka_trainer.cli``: the ``moka-train`` command.
"""
