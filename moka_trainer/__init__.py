"""moka-train: train MoKA adapters over a 4-bit base model."""
