"""moka-serve: serve MoKA adapters in vLLM. Importing this package never imports vLLM."""
