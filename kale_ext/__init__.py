"""kale_ext: lead-specific multimodal ECG learning (LS-EMVAE) as a PyKale plugin.

Reference: Suvon et al., "Multimodal Lead-Specific Modeling of ECG for Low-Cost Pulmonary Hypertension
Assessment", arXiv 2503.13470. Sub-packages follow the PyKale pipeline: ``loaddata``, ``prepdata``, ``embed``,
``predict``, ``pipeline``, ``evaluate``, ``interpret`` and ``utils``.
"""

__version__ = "0.1.0"
