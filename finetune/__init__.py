"""Finetuning-data selection and LoRA finetuning of generators (paper §5). Not built yet."""
