"""slothflow: instruction data + base LLM -> fine-tuned, evaluated, served model."""

__version__ = "0.1.0"
