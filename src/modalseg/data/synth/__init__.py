"""Deterministic synthetic datasets (no download): paired breast-like and unpaired cardiac-like."""
