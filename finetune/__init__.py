"""Finetuning generators on their own best images, chosen by predicted rich feedback (paper §5).

* :mod:`finetune.select` — group scored images by prompt, rank them by one predicted score or a weighted mean of
  several, and keep the best ``top_k`` per prompt that clear every threshold (the paper: best of eight,
  plausibility >= 0.8).
* :mod:`finetune.dataset` — export the kept images as an image folder with ``metadata.jsonl`` (file name, prompt,
  scores, seed, generator and RAHF identity), locally or on S3, atomically and idempotently.
* :mod:`finetune.lora` — LoRA finetuning of aMUSEd (masked-token cross-entropy) and Stable Diffusion
  (noise-prediction MSE) on such a folder, saving adapters in the diffusers LoRA format.
* :mod:`finetune.synthetic` — the synthetic world's finetuning: a fit of its flaw rates to such a folder
  (:class:`~finetune.synthetic.SyntheticFitConfig`, :func:`~finetune.synthetic.fit_synthetic`).
"""
