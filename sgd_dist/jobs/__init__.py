"""Runs submitted as jobs to a Ray cluster, and the job side that runs them there."""
