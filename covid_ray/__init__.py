"""covid-ray: chest X-ray classification with Ray Train, Ray Tune and ensembling."""
