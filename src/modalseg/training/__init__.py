"""modalseg.training"""
