"""KubeLoRA: fine-tune LoRA/QLoRA adapters and serve them with vLLM multi-LoRA on Kubernetes."""

__version__ = "0.1.0"
