"""Training with Lightning: pre-training a model with an objective, fine-tuning heads, saving and scoring.

- ``pretrain``: ``PretrainModule(model, objective)``, ``ECGPretrainDataModule``, ``EpochSeededSampler``,
  ``run_pretraining`` (checkpoints, exact resume, fallback to the newest intact checkpoint, DDP).
- ``finetune``: ``extract_features`` (frozen encoders, once), ``fit_classifier`` (a Lightning fit of a head or an
  end-to-end network, per-fold logs), ``predict_proba``, ``cross_validate`` (threshold and focal alpha from each
  fold's training part).
- ``artifacts``: saving and loading pre-trained models and fold classifiers (weights-only state dicts + JSON).
- ``scoring``: scoring new records with the fold classifiers, refusals with reasons.
"""
