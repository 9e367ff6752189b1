"""The ``metarl`` command line: train, eval, export, retrain, demo, launch."""
