"""mmjobs: Kubernetes-native pipelines for fine-tuning and evaluating multimodal LLMs."""

__version__ = "0.1.0"
