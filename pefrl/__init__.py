"""pefrl: parameter-efficient RL fine-tuning of LLMs on LoRA adapters over one frozen base."""

__version__ = "0.1.0"
