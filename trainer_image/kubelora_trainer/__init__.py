"""KubeLoRA trainer: ``kubelora-train`` turns a LoRAJob spec into a verified LoRA adapter.

Modules, one job each (heavy libraries are imported inside functions so ``--help`` and the pure parts
stay fast):

- ``__main__``   CLI, exit codes, termination message
- ``errors``     the typed failures that map to a reason and an exit code
- ``storage``    URIs -> fsspec filesystems and local paths; staging of s3 outputs
- ``data``       reading rows, format detection, validation with file/line, train/eval split
- ``validate``   tokenizer length checks and ValidationStats (the pre-flight)
- ``mapping``    pure spec -> LoraConfig / SFTConfig / BitsAndBytesConfig keyword arguments
- ``modelload``  resolving and loading the base model and tokenizer
- ``checkpoints`` finding the newest complete checkpoint to resume from
- ``progress``   progress reporting (log line + LoRAJob status patch) behind a small interface
- ``stopping``   SIGTERM -> save a checkpoint at the end of the step, then stop
- ``publish``    writing the adapter and its manifest atomically; ``verify_adapter_dir``
- ``train``      the training run that ties these together
"""

__version__ = "0.1.0"
