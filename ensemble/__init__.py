"""Top-k ensemble of search checkpoints: combine, calibrate, evaluate, export."""
