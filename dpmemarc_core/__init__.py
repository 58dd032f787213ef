"""dpmemarc: private, memory-lean fine-tuning of language models (DP-MemArc)."""

__version__ = "0.1.0"
