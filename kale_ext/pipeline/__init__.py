"""Lightning modules and loops that train a model with an objective (pre-training, fine-tuning).

- ``pretrain``: ``PretrainModule`` (ELBO + alignment, paper or reference objective), ``ECGPretrainDataModule``,
  ``EpochSeededSampler``, ``run_pretraining`` (checkpoints, exact resume, DDP) and ``save_model``/``load_model``.
- ``finetune``: ``extract_features`` (frozen encoders, once), ``fit_classifier``/``predict_proba`` (one loop for heads
  and supervised networks), ``cross_validate`` (threshold and focal alpha from each fold's training part).
"""
