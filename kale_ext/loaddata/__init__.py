"""Reading ECG records and building datasets: WFDB sources, lead names, caches, label tables."""
