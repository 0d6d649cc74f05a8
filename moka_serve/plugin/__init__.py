"""vLLM plugin: makes MoKA adapters first-class ``LoRARequest``s (issue #4).

Registered through the ``vllm.general_plugins`` entry point; vLLM calls :func:`register` once in
every process. All vLLM-specific code of the project lives in this package.
"""


def register() -> None:
    """Entry point called by vLLM. Not implemented yet: does nothing."""
