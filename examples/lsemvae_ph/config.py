"""Default configuration of the LS-EMVAE pulmonary hypertension example (yacs).

Every key has a comment. YAML files in ``configs/`` override only what they change; trailing ``KEY VALUE`` pairs on
the command line override both. ``get_cfg_defaults()`` returns a clone, so callers may mutate it freely.
``validate_cfg(cfg)`` checks every enumerated value before any work starts and names the accepted values.

Clinical thresholds (mPAP 20 mmHg, PAWP 15 mmHg) live here, not in the library.
"""

from pathlib import Path

from yacs.config import CfgNode

from kale_ext.embed.conv_ops import CONV_IMPLS
from kale_ext.embed.fusion import GATE_CONTEXTS
from kale_ext.embed.st_mem import ST_MEM_PRESETS
from kale_ext.embed.zoo import MODELS
from kale_ext.loaddata.diagnosis_labels import parse_groups
from kale_ext.loaddata.leads import resolve_leads
from kale_ext.loaddata.source_sets import split_sources
from kale_ext.predict.heads import FEATURE_MODES, WINDOW_POOLINGS
from kale_ext.predict.objectives import OBJECTIVES
from kale_ext.prepdata.corruption import CORRUPTION_KINDS

_C = CfgNode()

# Global seed: model initialisation, train/validation split, sampler order, per-epoch reseeding.
_C.SEED = 42

# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
_C.DATASET = CfgNode()
# Unlabelled pre-training records: a root with record_list.csv, a root whose CSV table points at the records (one
# path column per sampling rate: PTB-XL's ptbxl_database.csv), a folder of WFDB headers or a manifest CSV. Several
# sources: separate them with commas; record and subject ids are then tagged "<folder name>:<id>" so that sources
# cannot collide. Relative paths: from the current folder, else from the repository root (docs/data.md).
# Empty = the embedded synthetic cohort (generated once under DATASET.SYNTHETIC.DIR).
_C.DATASET.PRETRAIN_SOURCE = ""
# Labelled fine-tuning records (same accepted layouts). Empty = the synthetic cohort.
_C.DATASET.FINETUNE_SOURCE = ""
# Labels CSV for the fine-tuning records: haemodynamics (subject_id, mPAP, PAWP), a ready label column, or a table of
# coded statements (TASK.NAME statement, e.g. PTB-XL's ptbxl_database.csv).
_C.DATASET.LABELS_CSV = ""
# What the labels' ids name in the records' index: the record owner ("subject_id") or the record ("record_id").
_C.DATASET.LABEL_ID_COLUMN = "subject_id"
# Column of LABELS_CSV holding those ids when it is not named as DATASET.LABEL_ID_COLUMN (PTB-XL: ecg_id, the
# record id of a record-table source); empty = the column named DATASET.LABEL_ID_COLUMN.
_C.DATASET.LABELS_CSV_ID_COLUMN = ""
# Statement table of TASK.NAME statement (statement code, class column TASK.CLASS_COLUMN); empty = scp_statements.csv
# in the folder of DATASET.LABELS_CSV when present.
_C.DATASET.STATEMENTS_CSV = ""
# Ready 0/1 label column in LABELS_CSV; empty = derive the label from TASK.NAME and the thresholds below.
_C.DATASET.LABEL_COLUMN = ""
# Where the memory-mapped caches go; empty = <OUTPUT.DIR>/cache.
_C.DATASET.CACHE_DIR = ""
# Leads used for fine-tuning and evaluation: "6L" (I, II, III, aVR, aVL, aVF), "12L" or a comma list of names.
_C.DATASET.LEADS = "12L"
# Leads used for pre-training (the encoders built); must contain DATASET.LEADS.
_C.DATASET.PRETRAIN_LEADS = "12L"
# Sampling frequency every record is resampled to (Hz).
_C.DATASET.FS = 500
# Samples per lead after crop/pad (5000 = 10 s at 500 Hz, the paper's input).
_C.DATASET.INPUT_LENGTH = 5000
# Cap on pre-training records (0 = all); useful for smoke runs on a large archive.
_C.DATASET.MAX_PRETRAIN_RECORDS = 0
# DataLoader worker processes (0 = load in the main process).
_C.DATASET.NUM_WORKERS = 0
# Worker processes used to build the caches (0 = all cores).
_C.DATASET.PREPARE_WORKERS = 0

# Preprocessing of every record (kale_ext.prepdata.ecg_transforms.PreprocessSpec); part of every cache's fingerprint.
_C.DATASET.PREPROCESS = CfgNode()
# Powerline frequency removed by the smoothing filter: 50 (Europe, Asia), 60 (Americas) or 0 = off.
_C.DATASET.PREPROCESS.POWERLINE_HZ = 50.0
# High-pass cut-off (Hz) of the zero-phase baseline filter; 0 = off.
_C.DATASET.PREPROCESS.HIGHPASS_HZ = 0.5
# Derive III, aVR, aVL, aVF from I and II when absent (4-lead or 2-lead devices).
_C.DATASET.PREPROCESS.DERIVE_LIMB_LEADS = False
# Labelled (fine-tuning, scoring) records: mask a bad lead (flat, mostly NaN, saturated, implausible amplitude)
# instead of refusing the whole record.
_C.DATASET.PREPROCESS.MASK_BAD_LEADS = False
# Pre-training records: mask a bad lead instead of dropping the record (the VAE takes any subset of leads).
_C.DATASET.PREPROCESS.PRETRAIN_MASK_BAD_LEADS = True
# With MASK_BAD_LEADS / PRETRAIN_MASK_BAD_LEADS: fewest good leads a record must keep to be used.
_C.DATASET.PREPROCESS.MIN_GOOD_LEADS = 1
# Largest share of NaN samples a lead may have (short gaps are interpolated).
_C.DATASET.PREPROCESS.MAX_NAN_FRACTION = 0.2
# Longest run of NaN samples (seconds) that may be interpolated.
_C.DATASET.PREPROCESS.MAX_NAN_GAP_S = 1.0
# Largest share of samples at the lead's rails (clipping).
_C.DATASET.PREPROCESS.MAX_SATURATED_FRACTION = 0.1
# Plausible peak-to-peak amplitude range (mV) after unit conversion; outside it the gain is taken as wrong.
_C.DATASET.PREPROCESS.MIN_AMPLITUDE_MV = 0.01
# Upper end of the plausible amplitude range (mV).
_C.DATASET.PREPROCESS.MAX_AMPLITUDE_MV = 20.0

# The embedded synthetic cohort used when no data paths are configured (not physiology-grade; pipeline checks only).
_C.DATASET.SYNTHETIC = CfgNode()
# Folder of the generated WFDB records; empty = <OUTPUT.DIR>/data/synthetic.
_C.DATASET.SYNTHETIC.DIR = ""
# Number of labelled subjects (one record each) generated for fine-tuning.
_C.DATASET.SYNTHETIC.N_SUBJECTS = 400
# Additional unlabelled subjects for pre-training (the labelled ones are also used label-free).
_C.DATASET.SYNTHETIC.N_ARCHIVE_SUBJECTS = 400
# Records per archive subject (the unlabelled pre-training archive has several ECGs per subject).
_C.DATASET.SYNTHETIC.ARCHIVE_RECORDS_PER_SUBJECT = 2
# Seed of the synthetic generator.
_C.DATASET.SYNTHETIC.SEED = 0

# ---------------------------------------------------------------------------------------------------------------------
# Task: which clinical endpoint is predicted, with its thresholds
# ---------------------------------------------------------------------------------------------------------------------
_C.TASK = CfgNode()
# "ph" (mPAP > MPAP_THRESHOLD), "phenotype" (among PH: PAWP > PAWP_THRESHOLD = post-capillary),
# "pawp" (elevated PAWP: PAWP > PAWP_THRESHOLD), or "statement": TASK.LABEL names a class of the statement table
# (PTB-XL: NORM, MI, STTC, CD, HYP), one statement (LVH, IRBBB, RVH, RAO/RAE, ...) or a value / group of
# TASK.VALUE_COLUMN (RAD, LAD) of a diagnosis table (rules in docs/data.md, "Diagnosis tables").
_C.TASK.NAME = "ph"
# Right heart catheterisation mPAP threshold for PH (mmHg; 2022 ESC/ERS definition).
_C.TASK.MPAP_THRESHOLD = 20.0
# PAWP threshold separating post- from pre-capillary PH, and defining elevated PAWP (mmHg).
_C.TASK.PAWP_THRESHOLD = 15.0
# Column names of the haemodynamics CSV.
_C.TASK.MPAP_COLUMN = "mPAP"
# PAWP column name.
_C.TASK.PAWP_COLUMN = "PAWP"
# Plausible ranges (low, high) in mmHg; values outside (e.g. kPa, 9999 codes) are listed as problems and left out.
_C.TASK.MPAP_RANGE = [5.0, 100.0]
# Plausible PAWP range (mmHg).
_C.TASK.PAWP_RANGE = [1.0, 60.0]
# Name of the endpoint in every output; empty = from TASK.NAME, or DATASET.LABEL_COLUMN when that is given. With
# TASK.NAME statement: the target (a class, a statement or a value of TASK.VALUE_COLUMN).
_C.TASK.LABEL = ""
# TASK.NAME statement: column of DATASET.LABELS_CSV holding a dict statement -> likelihood per record.
_C.TASK.STATEMENT_COLUMN = "scp_codes"
# Column of the statement table giving each statement its class (superclass).
_C.TASK.CLASS_COLUMN = "diagnostic_class"
# A statement counts when its likelihood is >= this (0-100; 0 = every listed statement: PTB-XL gives rhythm and form
# statements likelihood 0).
_C.TASK.LIKELIHOOD_MIN = 0.0
# A target statement listed below TASK.LIKELIHOOD_MIN makes the record "negative" or leaves it out ("exclude").
_C.TASK.UNCERTAIN = "negative"
# Categorical (or multi-valued) column of DATASET.LABELS_CSV whose values TASK.LABEL may name (PTB-XL: heart_axis).
_C.TASK.VALUE_COLUMN = "heart_axis"
# Groups of values of TASK.VALUE_COLUMN, "NAME: value, value": TASK.LABEL RAD takes RAD, ARAD (abnormal) and AXR.
_C.TASK.VALUE_GROUPS = ["RAD: RAD, ARAD, AXR", "LAD: LAD, ALAD, AXL"]
# Separator of several values in one cell of TASK.VALUE_COLUMN (LUDB: a new line).
_C.TASK.VALUE_SEPARATOR = "\n"
# A record whose TASK.VALUE_COLUMN cell is empty is left out ("exclude") or "negative".
_C.TASK.EMPTY_VALUE = "exclude"

# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
_C.MODEL = CfgNode()
# A name of the model registry kale_ext.embed.zoo.MODELS: lsemvae, lsemvae_reference, mvae, mopoe, mmvae, betavae,
# stmem (pre-trained, frozen), random_encoder (untrained, frozen: the floor) or multimodal_cnn, resnet1d, xresnet1d
# (trained end to end in fine-tuning).
_C.MODEL.NAME = "lsemvae"
# Latent dimension D of every lead expert (paper: 256).
_C.MODEL.LATENT_DIM = 256
# HiME ablations: drop the shared PoE expert / the moment-matched mixture / the gate (uniform weights).
_C.MODEL.NO_POE = False
# Drop the mixture (fused posterior = shared PoE expert).
_C.MODEL.NO_MOE = False
# Replace the gate by uniform weights over present experts.
_C.MODEL.NO_GATE = False
# Shazeer's noisy gating (learned noise scale, training only).
_C.MODEL.GATE_NOISE = False
# Keep the k largest gate weights per sample (0 = dense: every present expert).
_C.MODEL.GATE_TOP_K = 0
# What the gate reads: "expert" (each expert's own mean and log-variance; the paper does not say) or "consensus" (also
# each lead's disagreement with the other leads, so a bad lead can be turned down; kale_ext.embed.fusion.ExpertGate).
_C.MODEL.GATE_CONTEXT = "expert"
# Include the N(0, I) prior expert in products of experts (MVAE practice).
_C.MODEL.USE_PRIOR = True
# Channel widths of the four stages of resnet1d / xresnet1d; empty = the published (64, 128, 256, 512).
_C.MODEL.BASELINE_WIDTHS = []
# How the small per-lead convolutions run (same maths and state dict; kale_ext.embed.conv_ops): "auto" (on CUDA the
# fused Triton kernels once their self-check passed on that card, else "blockdiag"; "conv" elsewhere; the
# environment variable KALE_EXT_CONV_IMPL overrides it), "triton" (forces the fused kernels, no check), or a torch
# path forced: "blockdiag" (block-diagonal dense kernels), "conv" (grouped), "conv2d" or "matmul".
_C.MODEL.CONV_IMPL = "auto"
# random_encoder: the registry model whose architecture is frozen at its seeded initialisation (no pre-training).
_C.MODEL.RANDOM_ARCHITECTURE = "lsemvae"
# ST-MEM size: "paper" (ViT-B: 768 wide, 12 blocks, 12 heads; decoder 256 wide, 4 blocks), "small" (CPU runs) or
# "published" ("paper" with the published sin-cos positions, normalised patch embedding, 7 of 30 patches kept and
# mean-then-LayerNorm features; docs/models.md lists the departures of the other two).
_C.MODEL.STMEM_PRESET = "paper"
# ST-MEM patch length in samples; 0 = the divisor of DATASET.INPUT_LENGTH giving the published 30 patches per lead
# most closely (30 x 75 at 2250 samples; 25 x 200 at 5000 and 25 x 20 at 500, where 30 does not divide the length).
_C.MODEL.STMEM_PATCH_SIZE = 0

# ---------------------------------------------------------------------------------------------------------------------
# Pre-training (self-supervised, all leads of DATASET.PRETRAIN_LEADS)
# ---------------------------------------------------------------------------------------------------------------------
_C.PRETRAIN = CfgNode()
# Where the pre-trained model goes; empty = <OUTPUT.DIR>/pretrain (the comparison shares one per method).
_C.PRETRAIN.DIR = ""
# Epochs (paper: 100).
_C.PRETRAIN.EPOCHS = 100
# Batch size per process (paper: 128).
_C.PRETRAIN.BATCH_SIZE = 128
# AdamW learning rate (paper: 1e-4; the reference code uses 5e-4).
_C.PRETRAIN.LR = 1e-4
# AdamW weight decay (reference code: 1e-5).
_C.PRETRAIN.WEIGHT_DECAY = 1e-5
# Gradient norm clipping (0 = off).
_C.PRETRAIN.GRAD_CLIP = 1.0
# Final KL weight beta (annealed linearly from 0).
_C.PRETRAIN.BETA = 1.0
# Epochs over which beta rises to PRETRAIN.BETA: per step in "paper" mode, min(epoch / this, 1) in "reference" mode.
_C.PRETRAIN.BETA_WARMUP_EPOCHS = 50.0
# Alignment weight gamma (Eq. 1); 0 disables alignment (the no-alignment ablation). The paper does not report it.
# 0.5 makes gamma ||mu_k - mu||^2 the negative log-density of a unit-variance Gaussian consensus between each expert
# and the fused mean, on the scale of the KL's 0.5 ||mu||^2 (docs/models.md, "loss scale").
_C.PRETRAIN.GAMMA = 0.5
# Reconstruction term: "gaussian" (negative log-likelihood summed over time and present leads with sigma SIGMA per
# lead, learned with LEARN_SIGMA, so BETA = 1 is the ELBO) or "mean" (per-lead MSE averaged over time: earlier
# versions' scale, which weighs the KL T / (2 sigma^2) times more than the ELBO does).
_C.PRETRAIN.RECON = "gaussian"
# Standard deviation of the Gaussian likelihood per lead, on z-scored signals (0.3 = a reconstruction explaining
# about 90% of each lead's variance). Used by the "elbo" and "capacity" objectives. A fixed sigma well below the
# residual RMS acts as a hidden beta = sigma^2 / residual MSE (0.09 / 0.88 ~ 0.1 measured on the demo).
_C.PRETRAIN.SIGMA = 0.3
# Learn one sigma per lead, bounded to [SIGMA_MIN, SIGMA_MAX] and starting at SIGMA; the ELBO ("train/neg_elbo") is
# then reported at the learned sigma and "sigma_mean" is logged. The gate balance weights keep the fixed SIGMA.
# "elbo" objective only; "capacity" keeps the fixed SIGMA.
_C.PRETRAIN.LEARN_SIGMA = False
# Lower bound of the learned sigma (LEARN_SIGMA).
_C.PRETRAIN.SIGMA_MIN = 0.05
# Upper bound of the learned sigma (LEARN_SIGMA).
_C.PRETRAIN.SIGMA_MAX = 1.0
# Gate balance (Shazeer et al. 2017): coefficient of the importance (CV^2) loss. The loss adds it times
# T / (2 SIGMA^2) (T = samples per lead; 1 with RECON "mean"): a dimensionless coefficient on the scale of the
# reconstruction, so the balance term is added on the ELBO's nat scale (the coefficient has no unit). It is not
# free: the ELBO alone prefers the PoE expert (compare train/neg_elbo with train/neg_elbo_poe, docs/fusion.md).
_C.PRETRAIN.GATE_IMPORTANCE = 0.1
# Coefficient of the KL(uniform || mean gate weight) barrier, times T / (2 SIGMA^2) like GATE_IMPORTANCE; 0 = off.
_C.PRETRAIN.GATE_BALANCE_KL = 0.3
# Sub-ELBO terms that make each lead expert a valid posterior on its own: "none", "unimodal" (MVAE: each lead's
# posterior reconstructs its lead) or "subset" (MoPoE: the product of one subset of the present leads, uniform over
# the non-empty subsets, reconstructs every present lead). One extra decode per step.
_C.PRETRAIN.SUBSET_TERMS = "none"
# Weight of the sub-ELBO term.
_C.PRETRAIN.SUBSET_WEIGHT = 1.0
# Lead dropout in pre-training: probability of dropping each present lead of each record from the model's input
# (at least one kept; the dropped leads are still reconstructed), so that lead subsets such as the 6 limb leads
# are trained for; 0 = off. Reaches the model (kale_ext.embed.multimodal_vae.MultimodalVAE lead_dropout); in
# training mode only.
_C.PRETRAIN.LEAD_DROPOUT = 0.0
# Corruption augmentation (kale_ext.prepdata.corruption): probability that a training record gets one lead
# corrupted in the model's input (the reconstruction target stays clean), so that a learned gate learns to turn a
# bad lead down; 0 = off. Validation is never corrupted.
_C.PRETRAIN.CORRUPT_PROB = 0.0
# Corruption kinds, drawn uniformly: "noise" (a burst of white noise), "flat" (a flat line), "wander" (baseline
# wander), "invert" (the lead times -1).
_C.PRETRAIN.CORRUPT_KINDS = ["noise", "flat", "wander", "invert"]
# Pre-training loss: "paper" = the model's registry objective ("elbo" for lsemvae, mvae, mopoe, mmvae, betavae: the
# RECON reconstruction (Gaussian NLL at SIGMA by default) + beta KL of the fused posterior + GAMMA alignment of every
# expert to the fused mean + gate balance + SUBSET_TERMS; "reference" for lsemvae_reference; "masked_patch" for
# stmem); "reference" = the authors' loss for any lead-VAE model: summed squared error x 1e-3 / batch, KL on the
# arithmetic mean of the lead encoders' mean and log-variance, alignment GAMMA x mean over leads of the MSE to the
# mean of the lead means (set GAMMA 0.1 to match), beta = min(epoch / BETA_WARMUP_EPOCHS, 1). It ignores RECON,
# SIGMA, LEARN_SIGMA, GATE_* and SUBSET_TERMS and keeps the model's fusion (MODEL.NAME lsemvae_reference gives the
# authors' fusion too). A non-empty PRETRAIN.OBJECTIVE overrides this key.
_C.PRETRAIN.LOSS_MODE = "paper"
# Pre-training objective by name (kale_ext.predict.objectives.OBJECTIVES: elbo, reference, masked_patch, capacity);
# empty = the model's own (registry) objective, or "reference" with LOSS_MODE reference.
_C.PRETRAIN.OBJECTIVE = ""
# beta-VAE's capacity-controlled KL (Burgess et al. 2018): weight gamma of |KL - C| and the final capacity C (nats),
# reached linearly over PRETRAIN.BETA_WARMUP_EPOCHS; see kale_ext.predict.pretext.ecg_capacity_settings.
_C.PRETRAIN.CAPACITY_GAMMA = 3.0
# Final capacity C of the beta-VAE (nats).
_C.PRETRAIN.CAPACITY_MAX = 50.0
# Share of subjects held out for validation (90:10 in the paper).
_C.PRETRAIN.VAL_FRACTION = 0.1
# Resume from <PRETRAIN.DIR>/checkpoints/last.ckpt when present.
_C.PRETRAIN.RESUME = True
# Run the model's forward through torch.compile (GPU speed: ~2x per step with the default block-diagonal
# convolutions on an H200, see docs/models.md; the first steps pay the compile time; checkpoints are unchanged).
_C.PRETRAIN.COMPILE = False
# Batches: "auto" (whole-batch reads from the cache, kale_ext.loaddata.batch_stream.BatchStream, float16 kept float16
# up to the device; held on the GPU and gathered by index when the cache fits), "stream" or "dataloader" (per item).
_C.PRETRAIN.LOADER = "auto"
# Hold the cache on the training device: "auto" (when it fits in half the free memory), "always" or "never".
_C.PRETRAIN.RESIDENT = "auto"
# Windowed pre-training, in samples (a departure from the paper, see docs/models.md "Windowed pre-training"):
# 0 = whole records (the paper's setting); 1..DATASET.INPUT_LENGTH = the pre-trainable models are built for windows
# of this length, every training step sees a fresh uniform random window of every record, validation every window,
# and features of a whole record pool all its windows (FINETUNE.WINDOW_POOLING). 250 = 2.5 s at 100 Hz.
_C.PRETRAIN.WINDOW = 0
# Stop pre-training after this many epochs without a better held-out reconstruction r and keep the best held-out
# epoch's weights (0 = off; needs PRETRAIN.VAL_FRACTION > 0).
_C.PRETRAIN.EARLY_STOP_PATIENCE = 0

# ---------------------------------------------------------------------------------------------------------------------
# Fine-tuning (head on frozen encoders, or supervised baselines end to end)
# ---------------------------------------------------------------------------------------------------------------------
_C.FINETUNE = CfgNode()
# Features of the frozen model: "fused_mean" (paper: the data pass through the frozen model; the fused posterior mean
# under the lead mask, so one head serves 12- and 6-lead input) or "concat_means" (the authors' code: concatenated
# per-lead posterior means of the leads in use). Models offering other features (ST-MEM: "pooled") use their own.
_C.FINETUNE.FEATURES = "fused_mean"
# Epochs (paper: 50).
_C.FINETUNE.EPOCHS = 50
# Epochs of the supervised baselines trained end to end; 0 = FINETUNE.EPOCHS.
_C.FINETUNE.SUPERVISED_EPOCHS = 0
# Batch size (paper: 32).
_C.FINETUNE.BATCH_SIZE = 32
# Learning rate (paper: 1e-4).
_C.FINETUNE.LR = 1e-4
# Weight decay of AdamW.
_C.FINETUNE.WEIGHT_DECAY = 1e-2
# Optimiser: "adamw" (paper) or "adam" (reference code).
_C.FINETUNE.OPTIMIZER = "adamw"
# Hidden units of the head (paper: 128).
_C.FINETUNE.HIDDEN_DIM = 128
# Dropout of the head (paper: 0.5).
_C.FINETUNE.DROPOUT = 0.5
# Loss: "focal" (paper; alpha, gamma below) or "cross_entropy" (reference code).
_C.FINETUNE.LOSS = "focal"
# Focal gamma; the paper gives none, 2.0 is the value of Lin et al. (2017).
_C.FINETUNE.FOCAL_GAMMA = 2.0
# Focal alpha (weight of the positive class); negative = the negative-class share of the fold's training part,
# so the minority class gets the larger weight.
_C.FINETUNE.FOCAL_ALPHA = -1.0
# Decision threshold from the fold's training part: "youden", "argmax" (0.5, the reference code) or a number.
_C.FINETUNE.THRESHOLD = "youden"
# Batch size of the frozen feature extraction.
_C.FINETUNE.FEATURE_BATCH_SIZE = 64
# With PRETRAIN.WINDOW > 0: how a record's windows make its features: "mean" (mean of the per-window features;
# chosen by measurement, docs/models.md "Windowed pre-training") or "poe" (product of the per-window Gaussian
# posteriors of each lead, then FINETUNE.FEATURES).
_C.FINETUNE.WINDOW_POOLING = "mean"

# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------------
_C.EVAL = CfgNode()
# Folds of stratified (and subject-grouped) cross-validation (paper: 5, 80:20).
_C.EVAL.N_SPLITS = 5
# Seed of the fold assignment (the reference code uses 42).
_C.EVAL.SEED = 42
# Bootstrap resamples of the pooled out-of-fold predictions for the 95% CI.
_C.EVAL.N_BOOT = 1000
# Column of DATASET.LABELS_CSV giving each record a fold number (PTB-XL: strat_fold, 1-10, patient-disjoint); empty =
# folds made by EVAL.SEED. Table fold v goes to cross-validation fold (v - 1) mod EVAL.N_SPLITS (10 folds, 5 splits:
# {1, 6}, {2, 7}, ...), so folds made disjoint by subject stay so.
_C.EVAL.FOLD_COLUMN = ""

# ---------------------------------------------------------------------------------------------------------------------
# Scoring new records (--stage predict)
# ---------------------------------------------------------------------------------------------------------------------
_C.PREDICT = CfgNode()
# Folder of WFDB records or a manifest CSV (path column) to score with the trained fold models.
_C.PREDICT.SOURCE = ""
# Output CSV; empty = <OUTPUT.DIR>/predict/scores.csv.
_C.PREDICT.OUT_CSV = ""

# ---------------------------------------------------------------------------------------------------------------------
# Interpretation (--stage interpret; examples/lsemvae_ph/interpret_stage.py)
# ---------------------------------------------------------------------------------------------------------------------
_C.INTERPRET = CfgNode()
# Also run interpretation in --stage all.
_C.INTERPRET.ENABLED = False
# Integration steps of integrated gradients.
_C.INTERPRET.N_STEPS = 32
# Normalised attribution above which a sample counts as important.
_C.INTERPRET.THRESHOLD = 0.5
# Baseline signal of integrated gradients: "zeros" or "mean".
_C.INTERPRET.BASELINE = "zeros"
# Number of subjects drawn per class for the per-record figures.
_C.INTERPRET.SUBJECTS = 2
# Moving-average width (seconds) of |attribution| before thresholding.
_C.INTERPRET.SMOOTH_S = 0.04
# Class attributed: "predicted" or a class index given as a string ("0", "1").
_C.INTERPRET.TARGET = "predicted"
# Held-out records per fold interpreted (a seeded stratified draw); 0 = all.
_C.INTERPRET.MAX_RECORDS = 200
# Records per integrated-gradients call (memory: BATCH_SIZE x N_STEPS forward passes).
_C.INTERPRET.BATCH_SIZE = 8
# Seed of the record draw.
_C.INTERPRET.SEED = 0

# ---------------------------------------------------------------------------------------------------------------------
# Lightning trainer (pre-training); scale with DDP through these keys
# ---------------------------------------------------------------------------------------------------------------------
_C.TRAINER = CfgNode()
# "auto" (GPU when present), "cpu" or "gpu".
_C.TRAINER.ACCELERATOR = "auto"
# Devices (processes) per node; -1 = all visible GPUs.
_C.TRAINER.DEVICES = 1
# Nodes (multi-node DDP, e.g. under SLURM or torchrun).
_C.TRAINER.NUM_NODES = 1
# "auto", "ddp", "ddp_spawn" or "ddp_find_unused_parameters_true".
_C.TRAINER.STRATEGY = "auto"
# "auto" = bf16-mixed on GPU, 32-true on CPU; or any Lightning precision string.
_C.TRAINER.PRECISION = "auto"
# Log every n training steps.
_C.TRAINER.LOG_EVERY_N_STEPS = 10
# Show progress bars when the output is a terminal; a redirected log gets one line per pre-training epoch instead.
_C.TRAINER.PROGRESS_BAR = True

# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------
_C.OUTPUT = CfgNode()
# Folder of every output of the run (config.yaml, metrics.json, predictions.csv, results.md, roc.png, checkpoints).
_C.OUTPUT.DIR = "outputs/lsemvae_ph"
# Method name shown in results tables; empty = MODEL.NAME plus ablation flags.
_C.OUTPUT.METHOD_LABEL = ""

ACCEPTED = {
    "MODEL.NAME": tuple(MODELS),
    "MODEL.CONV_IMPL": CONV_IMPLS,
    "MODEL.RANDOM_ARCHITECTURE": tuple(name for name, spec in MODELS.items() if spec.pretrained),
    "MODEL.STMEM_PRESET": tuple(ST_MEM_PRESETS),
    "MODEL.GATE_CONTEXT": GATE_CONTEXTS,
    "TASK.NAME": ("ph", "phenotype", "pawp", "statement"),
    "TASK.UNCERTAIN": ("negative", "exclude"),
    "TASK.EMPTY_VALUE": ("exclude", "negative"),
    "PRETRAIN.LOSS_MODE": ("paper", "reference"),
    "PRETRAIN.LOADER": ("auto", "stream", "dataloader"),
    "PRETRAIN.RECON": ("gaussian", "mean"),
    "PRETRAIN.OBJECTIVE": ("", *OBJECTIVES),
    "PRETRAIN.SUBSET_TERMS": ("none", "unimodal", "subset"),
    "PRETRAIN.RESIDENT": ("auto", "always", "never"),
    "FINETUNE.FEATURES": FEATURE_MODES,
    "FINETUNE.WINDOW_POOLING": WINDOW_POOLINGS,
    "FINETUNE.LOSS": ("focal", "cross_entropy"),
    "FINETUNE.OPTIMIZER": ("adamw", "adam"),
    "TRAINER.ACCELERATOR": ("auto", "cpu", "gpu", "cuda", "mps"),
}
STAGES = ("prepare", "pretrain", "finetune", "evaluate", "predict", "interpret", "all")


def get_cfg_defaults() -> CfgNode:
    """Return a clone of the default configuration (safe to mutate)."""
    return _C.clone()


def get_key(cfg: CfgNode, dotted: str):
    """The value of a dotted key such as ``PRETRAIN.BETA`` (``KeyError`` when it does not exist)."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate_cfg(cfg: CfgNode) -> None:
    """Check enumerated and numeric values; raise ``ValueError`` naming the accepted values.

    Called by ``main.py`` before any data are prepared or any model is trained.
    """
    for key, accepted in ACCEPTED.items():
        value = get_key(cfg, key)
        if value not in accepted:
            raise ValueError(f"{key} = {value!r} is not accepted; use one of: {', '.join(accepted)}")
    for key in ("DATASET.LEADS", "DATASET.PRETRAIN_LEADS"):
        try:
            resolve_leads(parse_leads(get_key(cfg, key)))
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"{key} = {get_key(cfg, key)!r} is not accepted ({err}); use 6L, 12L or a comma list of lead names "
                "from I, II, III, aVR, aVL, aVF, V1, ..., V6"
            ) from err
    leads = resolve_leads(parse_leads(cfg.DATASET.LEADS))
    pre = resolve_leads(parse_leads(cfg.DATASET.PRETRAIN_LEADS))
    missing = [lead for lead in leads if lead not in pre]
    if missing and MODELS[cfg.MODEL.NAME].pretrained:
        raise ValueError(
            f"DATASET.LEADS uses {missing}, which pre-training (DATASET.PRETRAIN_LEADS {cfg.DATASET.PRETRAIN_LEADS}) "
            "has no encoder for; add them to DATASET.PRETRAIN_LEADS"
        )
    for key, (low, high, low_open, high_open) in RANGES.items():
        value = get_key(cfg, key)
        below = value <= low if low_open else value < low
        above = high is not None and (value >= high if high_open else value > high)
        if below or above:
            lo = f"{low} {'<' if low_open else '<='} value"
            hi = "" if high is None else f" {'<' if high_open else '<='} {high}"
            raise ValueError(f"{key} = {value} is not accepted; use {lo}{hi}")
    validate_window(cfg)
    threshold = cfg.FINETUNE.THRESHOLD
    if threshold not in ("youden", "argmax"):
        try:
            number = float(threshold)
        except ValueError:
            number = float("nan")
        if not 0.0 < number < 1.0:
            raise ValueError(
                f"FINETUNE.THRESHOLD = {threshold!r} is not accepted; use youden, argmax or a number in (0, 1)"
            )
    if cfg.FINETUNE.FOCAL_ALPHA >= 0 and not 0.0 <= cfg.FINETUNE.FOCAL_ALPHA <= 1.0:
        raise ValueError(
            f"FINETUNE.FOCAL_ALPHA = {cfg.FINETUNE.FOCAL_ALPHA} is not accepted; use a value in [0, 1] (the weight "
            "of the positive class) or a negative value for the class balance of each fold"
        )
    if cfg.DATASET.PREPROCESS.POWERLINE_HZ not in (0, 0.0, 50, 50.0, 60, 60.0):
        raise ValueError(
            f"DATASET.PREPROCESS.POWERLINE_HZ = {cfg.DATASET.PREPROCESS.POWERLINE_HZ} is not accepted; use 50, 60 or 0 "
            "(off)"
        )
    if not 0 <= cfg.DATASET.PREPROCESS.HIGHPASS_HZ < cfg.DATASET.FS / 2:
        raise ValueError(
            f"DATASET.PREPROCESS.HIGHPASS_HZ = {cfg.DATASET.PREPROCESS.HIGHPASS_HZ} is not accepted; use 0 (off) or "
            f"a cut-off below half of DATASET.FS ({cfg.DATASET.FS / 2} Hz)"
        )
    for key in ("TASK.MPAP_RANGE", "TASK.PAWP_RANGE"):
        low_high = list(get_key(cfg, key))
        if len(low_high) != 2 or not low_high[0] < low_high[1]:
            raise ValueError(f"{key} = {low_high} is not accepted; use [low, high] with low < high (mmHg)")
    if cfg.TASK.NAME == "statement" and not cfg.TASK.LABEL:
        raise ValueError(
            "TASK.LABEL is empty; with TASK.NAME statement name the target: a class (NORM, MI, STTC, CD, HYP), a "
            "statement (LVH, IRBBB, ...) or a value of TASK.VALUE_COLUMN (RAD, LAD)"
        )
    try:
        parse_groups(list(cfg.TASK.VALUE_GROUPS))
    except ValueError as err:
        raise ValueError(f"TASK.VALUE_GROUPS is not accepted ({err})") from err
    kinds = list(cfg.PRETRAIN.CORRUPT_KINDS)
    if not kinds or any(kind not in CORRUPTION_KINDS for kind in kinds):
        raise ValueError(
            f"PRETRAIN.CORRUPT_KINDS = {kinds} is not accepted; use a non-empty list of: {', '.join(CORRUPTION_KINDS)}"
        )
    if cfg.PRETRAIN.LEARN_SIGMA and not cfg.PRETRAIN.SIGMA_MIN < cfg.PRETRAIN.SIGMA < cfg.PRETRAIN.SIGMA_MAX:
        raise ValueError(
            f"PRETRAIN.LEARN_SIGMA needs PRETRAIN.SIGMA_MIN < PRETRAIN.SIGMA < PRETRAIN.SIGMA_MAX; got "
            f"{cfg.PRETRAIN.SIGMA_MIN}, {cfg.PRETRAIN.SIGMA}, {cfg.PRETRAIN.SIGMA_MAX}"
        )
    strategy = str(cfg.TRAINER.STRATEGY)
    if strategy not in STRATEGIES and not strategy.startswith(("ddp", "fsdp", "deepspeed")):
        raise ValueError(f"TRAINER.STRATEGY = {strategy!r} is not accepted; use one of: {', '.join(STRATEGIES)}")
    precision = str(cfg.TRAINER.PRECISION)
    if precision not in PRECISIONS:
        raise ValueError(f"TRAINER.PRECISION = {precision!r} is not accepted; use one of: {', '.join(PRECISIONS)}")


def validate_window(cfg: CfgNode) -> None:
    """PRETRAIN.WINDOW fits the records, ST-MEM's patches tile it, early stopping has held-out subjects."""
    window, length = int(cfg.PRETRAIN.WINDOW), int(cfg.DATASET.INPUT_LENGTH)
    if window > length:
        raise ValueError(
            f"PRETRAIN.WINDOW = {window} is longer than the records (DATASET.INPUT_LENGTH {length}); use 0 (whole "
            f"records) or 1..{length} samples"
        )
    model_length = window or length
    patch = int(cfg.MODEL.STMEM_PATCH_SIZE)
    uses_patches = "patch_size" in MODELS[cfg.MODEL.NAME].options
    if uses_patches and patch and (model_length % patch or model_length // patch < 2):
        raise ValueError(
            f"MODEL.STMEM_PATCH_SIZE = {patch} does not tile the model's input of {model_length} samples "
            f"(PRETRAIN.WINDOW {window}, DATASET.INPUT_LENGTH {length}) into at least two patches; use a divisor of "
            f"{model_length} or 0 (chosen from the input length)"
        )
    if cfg.PRETRAIN.EARLY_STOP_PATIENCE > 0 and cfg.PRETRAIN.VAL_FRACTION <= 0:
        raise ValueError(
            "PRETRAIN.EARLY_STOP_PATIENCE needs held-out subjects to watch; set PRETRAIN.VAL_FRACTION > 0 (e.g. 0.1) "
            "or PRETRAIN.EARLY_STOP_PATIENCE 0"
        )


# (low, high, low exclusive, high exclusive); high None = no upper bound. Checked before any work starts.
RANGES = {
    "SEED": (0, None, False, False),
    "EVAL.N_SPLITS": (2, None, False, False),
    "EVAL.N_BOOT": (0, None, False, False),
    "PRETRAIN.EPOCHS": (0, None, False, False),
    "PRETRAIN.BATCH_SIZE": (1, None, False, False),
    "PRETRAIN.LR": (0.0, None, True, False),
    "PRETRAIN.WEIGHT_DECAY": (0.0, None, False, False),
    "PRETRAIN.GRAD_CLIP": (0.0, None, False, False),
    "PRETRAIN.BETA": (0.0, None, False, False),
    "PRETRAIN.BETA_WARMUP_EPOCHS": (0.0, None, False, False),
    "PRETRAIN.GAMMA": (0.0, None, False, False),
    "PRETRAIN.VAL_FRACTION": (0.0, 1.0, False, True),
    "PRETRAIN.CAPACITY_GAMMA": (0.0, None, False, False),
    "PRETRAIN.SIGMA": (0.0, None, True, False),
    "PRETRAIN.GATE_IMPORTANCE": (0.0, None, False, False),
    "PRETRAIN.GATE_BALANCE_KL": (0.0, None, False, False),
    "PRETRAIN.SUBSET_WEIGHT": (0.0, None, False, False),
    "PRETRAIN.LEAD_DROPOUT": (0.0, 1.0, False, True),
    "PRETRAIN.CORRUPT_PROB": (0.0, 1.0, False, False),
    "PRETRAIN.SIGMA_MIN": (0.0, None, True, False),
    "PRETRAIN.SIGMA_MAX": (0.0, None, True, False),
    "MODEL.GATE_TOP_K": (0, None, False, False),
    "PRETRAIN.CAPACITY_MAX": (0.0, None, False, False),
    "PRETRAIN.WINDOW": (0, None, False, False),
    "PRETRAIN.EARLY_STOP_PATIENCE": (0, None, False, False),
    "FINETUNE.EPOCHS": (1, None, False, False),
    "FINETUNE.SUPERVISED_EPOCHS": (0, None, False, False),
    "FINETUNE.BATCH_SIZE": (1, None, False, False),
    "FINETUNE.LR": (0.0, None, True, False),
    "FINETUNE.WEIGHT_DECAY": (0.0, None, False, False),
    "FINETUNE.HIDDEN_DIM": (1, None, False, False),
    "FINETUNE.DROPOUT": (0.0, 1.0, False, True),
    "FINETUNE.FOCAL_GAMMA": (0.0, None, False, False),
    "FINETUNE.FEATURE_BATCH_SIZE": (1, None, False, False),
    "MODEL.LATENT_DIM": (1, None, False, False),
    "MODEL.STMEM_PATCH_SIZE": (0, None, False, False),
    "DATASET.INPUT_LENGTH": (8, None, False, False),
    "DATASET.FS": (1, None, False, False),
    "DATASET.MAX_PRETRAIN_RECORDS": (0, None, False, False),
    "DATASET.NUM_WORKERS": (0, None, False, False),
    "DATASET.PREPARE_WORKERS": (0, None, False, False),
    "DATASET.SYNTHETIC.N_SUBJECTS": (0, None, False, False),
    "DATASET.SYNTHETIC.N_ARCHIVE_SUBJECTS": (0, None, False, False),
    "DATASET.SYNTHETIC.ARCHIVE_RECORDS_PER_SUBJECT": (1, None, False, False),
    "DATASET.PREPROCESS.MIN_GOOD_LEADS": (1, 12, False, False),
    "DATASET.PREPROCESS.MAX_NAN_FRACTION": (0.0, 1.0, False, False),
    "DATASET.PREPROCESS.MAX_NAN_GAP_S": (0.0, None, False, False),
    "DATASET.PREPROCESS.MAX_SATURATED_FRACTION": (0.0, 1.0, False, False),
    "DATASET.PREPROCESS.MIN_AMPLITUDE_MV": (0.0, None, False, False),
    "DATASET.PREPROCESS.MAX_AMPLITUDE_MV": (0.0, None, True, False),
    "TASK.MPAP_THRESHOLD": (0.0, None, True, False),
    "TASK.PAWP_THRESHOLD": (0.0, None, True, False),
    "TASK.LIKELIHOOD_MIN": (0.0, 100.0, False, False),
    "TRAINER.NUM_NODES": (1, None, False, False),
    "TRAINER.DEVICES": (-1, None, False, False),
    "TRAINER.LOG_EVERY_N_STEPS": (1, None, False, False),
    "INTERPRET.N_STEPS": (1, None, False, False),
    "INTERPRET.THRESHOLD": (0.0, 1.0, False, False),
    "INTERPRET.SUBJECTS": (0, None, False, False),
    "INTERPRET.SMOOTH_S": (0.0, None, False, False),
    "INTERPRET.MAX_RECORDS": (0, None, False, False),
    "INTERPRET.BATCH_SIZE": (1, None, False, False),
}
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true", "ddp_notebook", "fsdp", "deepspeed")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64", "16", "bf16")


def parse_leads(value: str) -> str | list[str]:
    """Turn a DATASET.LEADS value into what ``resolve_leads`` takes: a set name or a list of lead names."""
    value = str(value).strip()
    if "," in value:
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
REPO_ROOT = CONFIG_DIR.parent
# Keys holding data paths (PRETRAIN_SOURCE may list several, comma-separated): relative ones are resolved on loading.
PATH_KEYS = ("DATASET.PRETRAIN_SOURCE", "DATASET.FINETUNE_SOURCE", "DATASET.LABELS_CSV", "DATASET.STATEMENTS_CSV",
             "PREDICT.SOURCE")  # fmt: skip


def resolve_data_path(value: str, root: Path = REPO_ROOT) -> str:
    """A relative data path made absolute: from the current folder when it exists there, else from the repository root.

    So ``../shared/data/ecg/ptbxl`` in a config finds the data beside the checkout whether ``main.py`` runs from the
    repository root or from elsewhere, and the run's fingerprints hold the same absolute path either way. Absolute
    paths, empty values and paths found nowhere are returned unchanged (the stage that reads them names the path).
    """
    text = str(value).strip()
    if not text or Path(text).is_absolute():
        return text
    if Path(text).exists():
        return str(Path(text).resolve())
    candidate = root / text
    return str(candidate.resolve()) if candidate.exists() else text


def resolve_data_paths(cfg: CfgNode, root: Path = REPO_ROOT) -> None:
    """Resolve the relative paths of :data:`PATH_KEYS` in place (:func:`resolve_data_path`; cfg must be unfrozen)."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = cfg[section][name]
        items = split_sources(value) if key == "DATASET.PRETRAIN_SOURCE" else [value]
        resolved = [resolve_data_path(item, root) for item in items]
        if resolved != items:
            cfg[section][name] = ", ".join(resolved)


CONFIG_SUFFIXES = (".yaml", ".yml")


def resolve_cfg_path(name: str) -> Path:
    """A YAML config given as a path, or as a bare name (with or without .yaml) looked up in ``configs/``.

    Only YAML is accepted: yacs would execute a ``.py`` config as Python.
    """
    path = Path(name)
    candidates = [path, CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        known = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"config {name!r} not found as a path or in {CONFIG_DIR}; available: {known}")
    if found.suffix.lower() not in CONFIG_SUFFIXES:
        raise ValueError(f"config {found} is not a YAML file; configs are accepted only as .yaml/.yml")
    return found


def check_yaml_file(path: Path) -> None:
    """Parse a config file safely and raise a one-line ``ValueError`` naming the file and line when it cannot be used.

    Refused: YAML tags such as ``!!python/object`` (configs hold plain values only; nothing is ever executed), tab
    indentation, other syntax errors, undecodable bytes, and a top level that is not a ``KEY: value`` mapping.
    """
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"config {path} is not UTF-8 text ({err.reason}); save it as UTF-8 YAML") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        if isinstance(err, yaml.constructor.ConstructorError):
            raise ValueError(f"config {path}{where}: a YAML tag is not accepted ({problem}); configs hold plain values "
                             "only, remove the tag")  from None  # fmt: skip
        if "\\t" in problem or "\t" in problem:
            raise ValueError(f"config {path}{where}: a tab character; indent YAML with spaces") from None
        raise ValueError(f"config {path}{where} is not valid YAML ({problem}); fix it") from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"config {path} holds a {type(data).__name__}, not 'SECTION: KEY: value' mappings; see "
                         f"{CONFIG_DIR / '6L.yaml'} for the layout")  # fmt: skip


def load_cfg(cfg_files: list[str] | None = None, opts: list[str] | None = None) -> CfgNode:
    """Merge the defaults, the config files (in order) and ``KEY VALUE`` overrides; validate; freeze."""
    cfg = get_cfg_defaults()
    for name in cfg_files or []:
        path = resolve_cfg_path(name)
        check_yaml_file(path)
        cfg.merge_from_file(str(path))
    if opts:
        if len(opts) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd list: {opts}")
        pairs = []
        for key, value in zip(opts[::2], opts[1::2]):
            try:
                default = get_key(cfg, key)
            except KeyError as err:
                raise ValueError(f"{key} is not a configuration key; see examples/lsemvae_ph/config.py") from err
            # Text keys (FINETUNE.THRESHOLD youden|0.7, TASK.LABEL, paths) keep a value that looks like a number.
            pairs += [key, repr(str(value)) if isinstance(default, str) else value]
            try:
                cfg.merge_from_list(pairs[-2:])
            except ValueError as err:
                kind = type(default).__name__
                raise ValueError(f"{key} = {value!r} has the wrong type: use a {kind} like {default!r}") from err
    resolve_data_paths(cfg)
    validate_cfg(cfg)
    cfg.freeze()
    return cfg
