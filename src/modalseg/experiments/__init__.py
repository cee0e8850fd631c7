"""modalseg.experiments"""
